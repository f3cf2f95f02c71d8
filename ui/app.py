"""Similar-case browser. Run: `retrieve ui --index DIR`, or `streamlit run ui/app.py -- --index DIR`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Literal

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from retrieval.errors import RetrieveError
from ui.backend import (
    Answer,
    Session,
    case_fields,
    decode_upload,
    filter_choices,
    find_cases,
    load_image,
    open_session,
    query_frame,
    query_indexed,
    summary,
    upload_digest,
    upload_limit_mb,
    upload_limit_text,
    vote_view,
)
from ui.map2d import load_or_compute_map

DEFAULT_INDEX = Path("retrieve-demo") / "index"
CARD_WIDTH = 170  # px: result cards wrap to as many per row as fit (3 at 1024 px with the sidebar, 5 at 1400)
THUMB_SIDE = 256
QUERY_SIDE = 420
DISCLAIMER = "This is a suggestion from similar past cases, not a diagnosis."


def index_argument() -> Path:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--index", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return Path(args.index or os.environ.get("RETRIEVE_INDEX") or DEFAULT_INDEX)


def data_root_argument() -> str | None:
    """Where the indexed files are now, when they moved without the index (`-- --data-root DIR`)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data-root", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return args.data_root or os.environ.get("RETRIEVE_DATA_ROOT") or None


@st.cache_resource(show_spinner="Loading the index and its encoder ...")
def get_session(index_dir: str, data_root: str | None, manifest_mtime: float) -> Session:
    return open_session(index_dir, data_root)


@st.cache_data(show_spinner=False, max_entries=4096)
def thumbnail(path: str, frame: object, side: int | None, root: str | None = None) -> np.ndarray:
    return load_image(path, frame, side, root)


@st.cache_data(show_spinner=False, max_entries=8)
def decoded_upload(name: str, data: bytes, max_mb: int) -> tuple[list[np.ndarray], str]:
    """Each uploaded file is decoded (and hashed, to find it in the index) once, however often the page reruns."""
    return decode_upload(name, data, max_mb), upload_digest(data)


def label_scale(session: Session) -> alt.Scale:
    """The label colours every chart shares: the index's labels, sorted, on one fixed palette."""
    colours = session.label_colours()
    return alt.Scale(domain=list(colours), range=list(colours.values()))


def colour(session: Session) -> alt.Color:
    return alt.Color("label:N", scale=label_scale(session), legend=None)


@st.cache_data(show_spinner="Computing the embedding map (once per index) ...")
def get_map(index_dir: str, data_root: str | None, manifest_mtime: float) -> pd.DataFrame:
    return load_or_compute_map(get_session(index_dir, data_root, manifest_mtime).idx)


def text(v: object) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA else str(v)


def show_image(
    row: dict,
    side: int | None,
    caption: str | None = None,
    width: int | Literal["stretch", "content"] = "stretch",
    root: Path | None = None,
) -> None:
    """A case's image; with the session's data `root`, a file outside it is refused (load_image)."""
    try:
        image = thumbnail(row["path"], row.get("frame_index"), side, None if root is None else str(root))
        st.image(image, caption=caption, width=width)
    except RetrieveError as exc:
        st.warning(f"image unavailable: {exc}")


def sidebar(session: Session, index_dir: Path) -> dict:
    s = summary(session)
    st.sidebar.header("Index")
    st.sidebar.markdown(
        f"**{s['cases']} cases**, {s['patients']} patients  \nencoder `{s['encoder']}`  \n"
        f"{s['kind']} index, {s['dim']}-d  \nbuilt {s['created'][:19].replace('T', ' ')}  \n`{index_dir}`"
    )
    if s["labels"]:
        colours = session.label_colours()
        st.sidebar.dataframe(
            pd.DataFrame({"label": list(s["labels"]), "cases": list(s["labels"].values())}).style.map(
                lambda lab: f"color: {colours.get(lab, 'inherit')}; font-weight: 600", subset=["label"]
            ),
            hide_index=True,
            width="stretch",
        )
        if s["unlabelled"]:
            st.sidebar.caption(f"{s['unlabelled']} images without a label")
    else:
        st.sidebar.info("no labels: this index holds no labelled images, so there is no vote")
    st.sidebar.header("Search settings")
    n = len(session.rows)
    k = st.sidebar.slider("number of similar cases (k)", 1, max(1, min(50, n - 1)), min(10, max(1, n - 1)), key="k")
    vote = st.sidebar.radio(
        "vote",
        ["majority", "similarity"],
        horizontal=True,
        key="vote",
        help="similarity: each neighbour's vote weighs (1 + cosine) / 2",
    )
    exclude_own = st.sidebar.checkbox(
        "exclude the query's own patient",
        value=True,
        key="exclude_own",
        help="for indexed cases: other images of the same patient are left out",
    )
    include_self = st.sidebar.checkbox(
        "include the query itself and its near-duplicates",
        value=False,
        key="include_self",
        help="off: a query image that is already in the index (the same file, or its near-duplicate group) "
        "is left out of the results and the vote, so it cannot find itself",
    )
    filter_cols = ["(none)"] + (["label"] if session.labelled else []) + session.metadata_columns()
    col = st.sidebar.selectbox("filter candidates by", filter_cols, key="filter_col")
    where: list[tuple[str, str]] = []
    if col != "(none)":
        caption, values = filter_choices(session.rows, col)
        chosen = st.sidebar.selectbox(caption, values, key="filter_value") if values else None
        if chosen is not None:
            where = [(col, chosen)]
    return {"k": k, "vote": vote, "exclude_own": exclude_own, "include_self": include_self, "where": where}


def vote_panel(session: Session, answer: Answer) -> None:
    view = vote_view(answer.result.vote, len(answer.result.hits))
    if view.headline is None:
        st.info(view.message)
    else:
        st.markdown(f"### {view.headline}")
        st.markdown(view.detail)
    if len(view.bars):
        x = (
            alt.X("votes:Q", title=view.axis, scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"))
            if view.multilabel
            else alt.X("votes:Q", title=view.axis)
        )
        # a class of a label set need not be a label of its own, so set votes are drawn in one colour
        bar_colour = alt.value("#4c78a8") if view.multilabel else colour(session)
        st.altair_chart(
            alt.Chart(view.bars)
            .mark_bar()
            .encode(x=x, y=alt.Y("label:N", sort="-x", title=None), color=bar_colour, tooltip=["label", "votes"])
            .properties(height=34 * len(view.bars) + 50),
            width="stretch",
        )
    st.caption(DISCLAIMER)
    st.caption(f"answered in {answer.seconds * 1000:.0f} ms")


def _open_case(position: int) -> None:
    st.session_state["open_case"] = position


def _close_case() -> None:
    st.session_state.pop("open_case", None)


def _use_as_query(case_id: str) -> None:
    """Callbacks run before the widgets are drawn, so they may set the widgets' values."""
    st.session_state["mode"] = "Pick an indexed case"
    st.session_state["case_search"] = case_id
    st.session_state["case_choice"] = case_id
    _close_case()


def result_grid(session: Session, answer: Answer, key: str) -> None:
    """Fixed-width cards in a wrapping row: as many per line as the window holds, never squeezed."""
    hits, rows = answer.result.hits, answer.result.rows.to_dict("records")
    meta_cols = session.metadata_columns()
    colours = session.label_colours() if session.labelled else {}
    with st.container(horizontal=True, gap="small"):
        for rank, (hit, row) in enumerate(zip(hits, rows), start=1):
            with st.container(border=True, width=CARD_WIDTH):
                show_image(row, THUMB_SIDE, root=session.root)
                label = text(row.get("label"))
                shown = f":color[**{label}**]{{foreground='{colours[label]}'}}" if label in colours else f"**{label}**"
                card = f"**#{rank}** · similarity **{hit.score:.4f}**  \n"
                if session.labelled:
                    card += f"label {shown} · "
                st.markdown(card + f"patient {text(row.get('patient_id'))}")
                st.caption(str(row.get("id")))
                extra = ", ".join(f"{c}: {text(row.get(c))}" for c in meta_cols[:4])
                if extra:
                    st.caption(extra)
                st.button(
                    "Open",
                    key=f"{key}-open-{hit.position}",
                    width="stretch",
                    on_click=_open_case,
                    args=(int(hit.position),),
                )


def embedding_map(index_dir: Path, mtime: float, session: Session, answer: Answer, query_position: int | None) -> None:
    points = get_map(str(index_dir), data_root_argument(), mtime).copy()
    rows = session.rows
    points["label"] = (
        rows["label"].astype("string").fillna("(unlabelled)").to_numpy()[points["position"]]
        if "label" in rows
        else "(unlabelled)"
    )
    points["patient"] = rows["patient_id"].astype("string").fillna("-").to_numpy()[points["position"]]
    neighbour_pos = {h.position: rank for rank, h in enumerate(answer.result.hits, start=1)}
    points["role"] = ["neighbour" if p in neighbour_pos else "collection" for p in points["position"]]
    base = (
        alt.Chart(points)
        .mark_circle(size=28, opacity=0.55)
        .encode(
            x=alt.X("x:Q", axis=None),
            y=alt.Y("y:Q", axis=None),
            color=alt.Color(
                "label:N",
                scale=label_scale(session),
                legend=alt.Legend(title="label", orient="bottom", columns=4),
            ),
            tooltip=["id", "label", "patient"],
        )
    )
    layers = [base]
    near = points[points["role"] == "neighbour"]
    if len(near):
        layers.append(
            alt.Chart(near)
            .mark_circle(size=140, stroke="black", strokeWidth=1.5)
            .encode(x="x:Q", y="y:Q", color=colour(session), tooltip=["id", "label", "patient"])
        )
    if query_position is not None and (points["position"] == query_position).any():
        q = points[points["position"] == query_position].assign(what="query")
    elif len(near):  # an upload has no map position: show it at its neighbours' similarity-weighted centre
        on_map = [h for h in answer.result.hits if h.position in set(near["position"])]
        w = np.array([max(h.score, 0) for h in on_map])
        order = near.set_index("position").loc[[h.position for h in on_map]]
        q = pd.DataFrame(
            {
                "x": [np.average(order["x"], weights=w + 1e-9)],
                "y": [np.average(order["y"], weights=w + 1e-9)],
                "id": ["query (approximate position)"],
                "label": ["query"],
                "patient": ["-"],
                "what": ["query"],
            }
        )
    else:
        q = None
    if q is not None:
        layers.append(
            alt.Chart(q)
            .mark_point(shape="diamond", size=320, filled=True, color="black")
            .encode(x="x:Q", y="y:Q", tooltip=["id", "label", "patient"])
        )
    st.altair_chart(alt.layer(*layers).properties(height=480), width="stretch")
    st.caption(
        "2-D map of every indexed case (PCA to 50, then t-SNE), coloured by label; the query's "
        "neighbours are outlined, the query is the black diamond. Hover a point to see the case."
    )


def case_view(
    session: Session, position: int, settings: dict, query_row: dict | None, query_image: np.ndarray | None
) -> None:
    """Side-by-side view of the query and one case, with that case's own neighbours."""
    row = session.rows.iloc[position].to_dict()
    with st.container(horizontal=True, gap="small"):
        st.button("Back to results", key="back", on_click=_close_case)
        st.button("Use as query", key="use-as-query", on_click=_use_as_query, args=(str(row["id"]),))
    left, right = st.columns(2)
    with left:
        st.subheader("Query")
        if query_image is not None:
            st.image(query_image, width="stretch")
        elif query_row is not None:
            show_image(query_row, None, root=session.root)
    with right:
        st.subheader(f"Case {row['id']}")
        show_image(row, None, root=session.root)
        fields = case_fields(row)  # never a person-name column, even from an old index that holds one
        st.dataframe(
            pd.DataFrame({"field": [f for f, _ in fields], "value": [text(v) for _, v in fields]}),
            hide_index=True,
            width="stretch",
        )
    st.subheader("Its own similar cases")
    answer = query_indexed(
        session,
        position,
        settings["k"],
        settings["exclude_own"],
        settings["where"],
        settings["vote"],
        settings["include_self"],
    )
    result_grid(session, answer, key=f"case{position}")


def main() -> None:
    st.set_page_config(page_title="retrieve: similar cases", layout="wide")
    st.title("Similar past cases")
    index_dir = index_argument()
    manifest = index_dir / "manifest.json"
    if not manifest.is_file():
        st.error(
            f"No index at {index_dir}. Build one with `retrieve index build DATA --index {index_dir}`, "
            "or run `retrieve ui` with no --index to open the demo index."
        )
        st.stop()
    mtime = manifest.stat().st_mtime
    try:
        session = get_session(str(index_dir), data_root_argument(), mtime)
    except RetrieveError as exc:
        st.error(f"Cannot open this index: {exc}")
        st.stop()
    settings = sidebar(session, index_dir)
    mode = st.radio("Query by", ["Upload an image", "Pick an indexed case"], horizontal=True, key="mode")

    answer: Answer | None = None
    query_row: dict | None = None
    query_image: np.ndarray | None = None
    query_position: int | None = None
    try:
        if mode == "Upload an image":
            # the widget, the page's text and decode_upload enforce one limit (Streamlit's own
            # server.maxUploadSize only when it is lower than ours)
            max_mb = upload_limit_mb(st.get_option("server.maxUploadSize"))
            upload = st.file_uploader(upload_limit_text(max_mb), key="upload", max_upload_size=max_mb)
            if upload is None:
                st.info("Upload an image to see the most similar indexed cases.")
                st.stop()
            frames, digest = decoded_upload(upload.name, upload.getvalue(), max_mb)
            frame = st.slider("frame", 0, len(frames) - 1, 0, key="frame") if len(frames) > 1 else 0
            name = upload.name if len(frames) == 1 else f"{upload.name}#{frame}"
            query_image = frames[frame]
            answer = query_frame(
                session,
                name,
                query_image,
                settings["k"],
                [],
                settings["where"],
                settings["vote"],
                digest=digest,
                include_self=settings["include_self"],
            )
        else:
            search = st.text_input("Find a case by id, path or patient", key="case_search")
            found = find_cases(session.rows, search)
            if found.empty:
                st.warning(f"No indexed case matches '{search}'.")
                st.stop()
            ids = found["id"].astype(str).tolist()
            choice = st.selectbox("case", ids, key="case_choice")
            query_position = int(found.index[ids.index(choice)])
            query_row = session.rows.iloc[query_position].to_dict()
            answer = query_indexed(
                session,
                query_position,
                settings["k"],
                settings["exclude_own"],
                settings["where"],
                settings["vote"],
                settings["include_self"],
            )
    except RetrieveError as exc:
        st.error(str(exc))
        st.stop()

    if "open_case" in st.session_state:
        case_view(session, st.session_state["open_case"], settings, query_row, query_image)
        return
    q_col, v_col = st.columns([1, 1], gap="medium")
    with q_col:
        st.subheader("Query")
        if query_image is not None:
            st.image(query_image, caption=answer.result.query, width="stretch")
        else:
            assert query_row is not None  # an indexed case was picked
            label = f" · label {text(query_row.get('label'))}" if session.labelled else ""
            show_image(
                query_row,
                QUERY_SIDE,
                caption=f"{query_row['id']}{label} · patient {text(query_row.get('patient_id'))}",
                root=session.root,
            )
    with v_col:
        vote_panel(session, answer)
    st.subheader(f"{len(answer.result.hits)} most similar cases")
    result_grid(session, answer, key="results")
    with st.expander("Embedding map of the collection", expanded=False):
        embedding_map(index_dir, mtime, session, answer, query_position)


main()
