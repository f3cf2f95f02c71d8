"""Similar-case browser (Streamlit): `retrieve ui --index DIR` or `streamlit run ui/app.py -- --index DIR`."""
