"""fitsim dashboard: the router.  One file per page under ``app_pages/``; adding a page is one line here."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout that was not installed with `pip install -e`
    sys.path.insert(0, str(ROOT))

PAGES = Path(__file__).resolve().parent / "app_pages"

st.set_page_config(page_title="fitsim", page_icon=":material/memory:", layout="wide")
st.navigation([
    st.Page(PAGES / "estimate.py", title="Estimate", icon=":material/memory:", default=True),
    st.Page(PAGES / "compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page(PAGES / "plan.py", title="Plan", icon=":material/travel_explore:"),
    st.Page(PAGES / "hardware.py", title="Hardware", icon=":material/developer_board:"),
    st.Page(PAGES / "validation.py", title="Validation", icon=":material/fact_check:"),
]).run()
