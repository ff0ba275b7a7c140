"""Estimate: one scenario from the sidebar (and the URL), its verdict, key numbers, figures and downloads."""

from __future__ import annotations

import streamlit as st

from app import knobs, loaders, views, widgets

PREFIX = "e."  # widget keys and state of this page's scenario
PARAM = "s"  # URL parameter holding the scenario as compact JSON


def main() -> None:
    problems = widgets.sync_from_url(PREFIX, PARAM)
    inp = widgets.scenario_form(PREFIX)
    widgets.write_url(PREFIX, PARAM, knobs.to_param(inp.data))

    st.title("Will it fit?")
    if problems:
        st.error("The link's scenario has problems (the rest of it was loaded): " + "; ".join(problems))
    if inp.error:
        st.error(f"Invalid scenario: {inp.error}")
        return
    try:
        e = loaders.run_estimate(inp.scenario.model_dump_json())
    except Exception as err:  # an engine error is one line, never a traceback
        st.error(f"The estimate failed: {widgets.one_line(f'{type(err).__name__}: {err}')}")
        return
    views.estimate_page(inp.scenario, inp.data, e)


main()
