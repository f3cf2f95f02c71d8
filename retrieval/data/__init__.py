"""Data in: image files and DICOM -> grayscale arrays -> tensors; datasets from folders or manifests."""
