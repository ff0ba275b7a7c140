"""Hardware: the device catalog, the roofline of one device and where its efficiency figures come from."""

from __future__ import annotations

import streamlit as st

from app import figures, loaders, views
from hwprofiles.schema import Efficiency

DEVICE_KEY = "hw.device"
ESTIMATE_STATE = "e.__state"  # the Estimate page's scenario: its GPU is shown first


def efficiency_rows(device) -> list[dict[str, str]]:
    rows = []
    for name, info in Efficiency.model_fields.items():
        value = getattr(device.efficiency, name)
        if isinstance(value, tuple):
            value = ", ".join(f"{f:.0e} FLOP: {r:g}" for f, r in value)
        rows.append({"figure": name, "value": "-" if value is None else str(value),
                     "meaning": info.description or "",
                     "source": device.sources.get(f"efficiency.{name}", "-")})
    return rows


def main() -> None:
    st.title("Hardware")
    st.caption("One YAML profile per device under hwprofiles/devices/; dense peaks; every number cites its source.")
    st.dataframe(loaders.device_rows(), hide_index=True, key="hw.table")

    names = loaders.device_names()
    labels = loaders.device_labels()
    if DEVICE_KEY not in st.session_state:
        chosen = (st.session_state.get(ESTIMATE_STATE) or {}).get("gpu")
        st.session_state[DEVICE_KEY] = chosen if chosen in names else names[0]
    name = st.selectbox("device", names, key=DEVICE_KEY, format_func=lambda n: labels.get(n, n))
    d = loaders.device(name)
    views.chart(figures.roofline(d), "fig.roofline")
    st.subheader("Efficiency figures and their calibration source")
    st.dataframe(efficiency_rows(d), hide_index=True, key="hw.efficiency")
    if d.price_usd_per_hour is not None:
        st.caption(f"Price: ${d.price_usd_per_hour:g} per device-hour ({d.price_source}, {d.price_date}).")
    else:
        st.caption("No price collected for this device.")
    st.subheader("Systems (nodes)")
    st.caption("One YAML profile per node under hwprofiles/systems/: fabrics with measured NCCL bus bandwidth, NICs, "
               "host, NVMe, price and power, each with its source.")
    st.dataframe(loaders.system_rows(), hide_index=True, key="hw.systems")


main()
