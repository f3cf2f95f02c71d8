"""Training encoders with little labelling: Siamese (papers 000, 003), SimCLR, SupCon, weak-SimCLR (001)."""
