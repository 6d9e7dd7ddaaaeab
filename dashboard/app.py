"""geowm dashboard: the page layout. Start it with ``geowm dashboard --workdir DIR``.

The workdir comes only from the command line (``streamlit run dashboard/app.py -- --workdir DIR``) or
``$GEOWM_WORKDIR``: nothing in the browser (URL, widgets) can point the server at another folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:  # a source checkout run without installing the package
    sys.path.insert(0, _REPO)

import numpy as np  # noqa: E402
import streamlit as st  # noqa: E402

from dashboard import cache, data, views  # noqa: E402

st.set_page_config(page_title="geowm alerts", page_icon="🛰️", layout="wide")

root = data.workdir_from(sys.argv[1:], os.environ)
if root is None:
    st.title("geowm alerts")
    st.info("No workdir given. Start the dashboard with `geowm dashboard --workdir DIR` (a folder holding "
            "cube/, forecasts/ and alerts/, e.g. the `demo/` that `make demo` writes).")
    st.stop()
try:
    src = cache.sources(str(root))
except data.WorkdirError as exc:
    st.title("geowm alerts")
    st.error(str(exc))
    st.stop()

info = cache.cube_info(str(root), src.version) if src.cube is not None else None
flt, opts = views.sidebar(src, info)

alerts = src.alerts
shown = data.filter_alerts(alerts, flt) if alerts is not None and len(alerts) else None
if shown is not None and len(shown):
    if st.session_state.get("sel_alert") not in set(shown["id"]):
        st.session_state["sel_alert"] = shown["id"].iloc[0]  # default: the highest peak score shown
    if st.session_state.get("alert_pick") not in set(shown["id"]):
        st.session_state["alert_pick"] = st.session_state["sel_alert"]
selected = st.session_state.get("sel_alert") if shown is not None and len(shown) else None

st.title("geowm alerts")
status = []
if info is not None and len(info.times):
    status.append(f"last acquisition **{str(info.times[-1])[:10]}**")
if src.forecasts is not None and src.forecasts.sizes.get("init_time"):
    status.append(f"last forecast init **{str(np.max(src.forecasts['init_time'].values))[:10]}**")
if alerts is not None:
    status.append(f"**{len(shown) if shown is not None else 0}** of {len(alerts)} alerts shown")
st.markdown(f"Workdir `{root}` · " + " · ".join(status))
for name in ("cube", "forecasts", "alerts"):
    if name in src.notes and name in src.workdir.paths:  # present but unreadable
        st.warning(src.notes[name])
if src.cube is None:
    st.info(f"No cube yet ({src.notes.get('cube', 'cube/ missing')}): run `geowm ingest ... --cube {root}/cube`.")
if src.forecasts is None:
    st.info(f"No forecasts yet ({src.notes.get('forecasts', 'forecasts/ missing')}): run `geowm forecast ... "
            f"--out {root}/forecasts`.")
if alerts is None:
    st.info(f"No alerts yet ({src.notes.get('alerts', 'alerts/ missing')}): run `geowm anomalies ... "
            f"--out {root}/alerts`.")
elif len(alerts) == 0:
    st.info("No alerts: the last anomaly run confirmed none.")
elif shown is not None and len(shown) == 0:
    st.info(f"No alert matches the filters ({len(alerts)} alerts in all): widen them in the sidebar.")

left, right = st.columns([3, 2], gap="medium")
with left:
    views.map_view(src, opts, shown, selected)
with right:
    views.drilldown_view(src, info, shown)

if shown is not None and len(shown):
    st.subheader(f"Alerts ({len(shown)})")
    views.table_view(src, shown)

with st.expander("System", expanded=True):
    views.system_view(src)
