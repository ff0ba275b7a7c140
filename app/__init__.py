"""fitsim's Streamlit dashboard: ``streamlit run app/streamlit_app.py`` (after ``pip install -e ".[app]"``).

streamlit_app.py is the router; one file per page under app_pages/; knobs.py reads the Scenario's fields,
widgets.py draws them, figures.py and exports.py are pure builders, loaders.py holds the cached reads.
"""
