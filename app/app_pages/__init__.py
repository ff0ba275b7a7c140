"""The dashboard's pages, one file each (run by ``st.navigation`` in ``app/streamlit_app.py``)."""
