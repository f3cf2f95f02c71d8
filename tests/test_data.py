"""Reading images (all formats, DICOM), preprocessing, and dataset discovery."""

import numpy as np
import pandas as pd
import pytest
from conftest import write_dicom, write_png
from PIL import Image

from retrieval.config import PreprocessConfig
from retrieval.data.dataset import FrameDataset, load_dataset
from retrieval.data.imageio import read_frame, read_frames
from retrieval.data.preprocess import crop_sector, preprocess_frame, resize_square, to_tensor
from retrieval.demo.synthetic import demo_patients, render_frame
from retrieval.errors import RetrieveError, UnreadableImageError


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_raster_formats_to_gray(tmp_path, suffix):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200
    p = tmp_path / f"x{suffix}"
    Image.fromarray(rgb).save(p)
    (img,) = read_frames(p)
    assert img.shape == (20, 30) and img.dtype == np.uint8
    assert abs(int(img.mean()) - round(0.299 * 200)) <= 2


def test_16bit_png_is_stretched(tmp_path):
    a = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    img = read_frame(p)
    assert img.min() == 0 and img.max() == 255


def test_corrupt_truncated_and_non_image(tmp_path):
    good = write_png(tmp_path / "good.png", np.full((64, 64), 100, np.uint8))
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    (tmp_path / "notes.txt").write_text("hello")
    for name in ("trunc.png", "junk.png"):
        with pytest.raises(UnreadableImageError, match=name):
            read_frames(tmp_path / name)
    with pytest.raises(UnreadableImageError, match="unsupported file type"):
        read_frames(tmp_path / "notes.txt")
    with pytest.raises(UnreadableImageError, match="not found"):
        read_frames(tmp_path / "missing.png")


def test_dicom_ct_rescale_and_window(tmp_path):
    # stored values 0..: HU = stored - 1024. Window [-100, 400]: HU -100 -> 0, 150 -> 127/128, 400 -> 255
    hu = np.array([[-1000, -100, 150, 400, 1000]], np.int32)
    stored = (hu + 1024).astype(np.uint16)
    p = write_dicom(tmp_path / "ct.dcm", stored, modality="CT", intercept=-1024.0)
    img = read_frame(p)
    assert img[0].tolist()[0] == 0 and img[0, 1] == 0 and img[0, 3] == 255 and img[0, 4] == 255
    assert abs(int(img[0, 2]) - 128) <= 1
    wide = read_frame(p, ct_window=(-1000, 1000))
    assert wide[0, 0] == 0 and abs(int(wide[0, 2]) - 146) <= 1


def test_dicom_multiframe_and_monochrome1(tmp_path):
    clip = np.stack([np.full((16, 16), v, np.uint16) for v in (0, 100, 200)])
    clip[:, 0, 0] = 300  # give every frame a range
    p = write_dicom(tmp_path / "clip.dcm", clip)
    frames = read_frames(p)
    assert len(frames) == 3
    # one range (0..300) for the whole clip: 0 -> 0, 100 -> 85, 200 -> 170
    assert [int(f[5, 5]) for f in frames] == [0, 85, 170]
    assert read_frame(p, 2)[5, 5] == frames[2][5, 5]
    inv = write_dicom(tmp_path / "inv.dcm", clip[1], photometric="MONOCHROME1")
    plain = write_dicom(tmp_path / "plain.dcm", clip[1])
    assert (read_frame(inv) == 255 - read_frame(plain)).all()
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 200)
    with pytest.raises(UnreadableImageError, match="bad.dcm"):
        read_frames(bad)


def test_crop_sector_drops_margins_and_annotations():
    p = demo_patients(1, seed=3)[0]
    img = render_frame(p, 0, size=256)
    cropped = crop_sector(img)
    assert cropped.shape[0] < 256 and cropped.shape[1] < 256
    # burned-in text is in the top corners; after cropping, the top rows hold no bright glyph pixels
    assert (img[4:24, :52] > 200).any()
    assert not (cropped[:3] > 215).all()
    assert cropped.mean() > img.mean()  # black margins removed
    blank = np.zeros((50, 50), np.uint8)
    assert crop_sector(blank) is blank


def test_resize_modes():
    img = np.full((50, 100), 200, np.uint8)
    padded = resize_square(img, 64, "pad")
    assert padded.shape == (64, 64) and padded[0, 32] == 0 and padded[32, 32] == 200
    squashed = resize_square(img, 64, "squash")
    assert squashed.shape == (64, 64) and squashed.min() == 200
    t = to_tensor(preprocess_frame(img, PreprocessConfig(image_size=32)))
    assert t.shape == (1, 32, 32) and float(t.max()) == pytest.approx(200 / 255)


def test_preprocess_config_validation():
    with pytest.raises(RetrieveError, match="image-size"):
        PreprocessConfig(image_size=2)
    with pytest.raises(RetrieveError, match="resize"):
        PreprocessConfig(resize="crop")


def test_folder_dataset_labels_from_subfolders(tmp_path):
    for label in ("a", "b"):
        for j in range(2):
            write_png(tmp_path / label / f"{j}.png", np.full((10, 10), 50 * j, np.uint8))
    (tmp_path / "a" / "readme.txt").write_text("x")
    t = load_dataset(tmp_path)
    assert sorted(t.rows["label"]) == ["a", "a", "b", "b"]
    assert t.rows["id"].tolist()[0] == "a/0.png"
    assert [s.reason for s in t.skipped] == ["not an image file ('.txt')"]


def test_manifest_dataset(tmp_path):
    write_png(tmp_path / "img" / "1.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "img" / "2.png", np.zeros((8, 8), np.uint8))
    pd.DataFrame(
        {
            "path": ["img/1.png", "img/2.png", "img/gone.png"],
            "label": ["x", "y", "x"],
            "patient_id": ["p1", None, "p2"],
            "site": ["A", "B", "C"],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    t = load_dataset(tmp_path / "m.csv")
    assert len(t.rows) == 2 and list(t.rows.columns) == ["id", "path", "label", "patient_id", "frame_index", "site"]
    assert t.rows["patient_id"].iloc[0] == "p1" and pd.isna(t.rows["patient_id"].iloc[1])
    assert "gone.png" in t.skipped[0].path and t.skipped[0].reason == "file not found"
    # a folder holding labels.csv uses it
    (tmp_path / "m.csv").rename(tmp_path / "labels.csv")
    assert len(load_dataset(tmp_path).rows) == 2


def test_person_name_columns_are_dropped_at_ingest(tmp_path, caplog):
    write_png(tmp_path / "img" / "1.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "img" / "2.png", np.full((8, 8), 9, np.uint8))
    pd.DataFrame(
        {
            "path": ["img/1.png", "img/2.png"],
            "label": ["x", "y"],
            "PatientName": ["DOE^JOHN", "ROE^JANE"],
            "surname": ["DOE", "ROE"],
            "referring_physician": ["Smith^Anna", "Smith^Anna"],
            "series_name": ["s1", "s2"],
            "file_name": ["1.png", "2.png"],
        }
    ).to_csv(tmp_path / "labels.csv", index=False)
    with caplog.at_level("WARNING", logger="retrieval.data.dataset"):
        t = load_dataset(tmp_path)
    assert list(t.rows.columns) == ["id", "path", "label", "patient_id", "frame_index", "series_name", "file_name"]
    assert not any(n in str(v) for v in t.rows.to_numpy().ravel() for n in ("DOE", "ROE", "Smith"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "PatientName, surname, referring_physician" in warnings[0]
    assert not any(n in caplog.text for n in ("DOE", "ROE", "Smith"))  # the columns are named, never their values


def test_a_link_out_of_the_data_root_is_stored_as_placed(tmp_path, caplog):
    """A symlink in the data folder to a file outside it keeps its own path (relative to the data root) as id
    and path, never the target's absolute path; a path named outside the root keeps its absolute path."""
    from retrieval.relocate import with_rel_paths

    data = tmp_path / "data"
    write_png(data / "a" / "img0.png", np.zeros((8, 8), np.uint8))
    secret = write_png(tmp_path / "outside" / "secret_DOE_JOHN.png", np.full((8, 8), 7, np.uint8))
    (data / "a" / "link.png").symlink_to(secret)
    (data / "b").mkdir()
    (data / "b" / "inside.png").symlink_to(data / "a" / "img0.png")  # a link inside the root: its target, as before
    t = load_dataset(data)
    rows = t.rows.set_index("id")
    assert sorted(rows.index) == ["a/img0.png", "a/link.png"]
    assert rows.loc["a/link.png", "path"] == str(data.resolve() / "a" / "link.png")
    assert rows.loc["a/link.png", "label"] == "a"
    assert "secret" not in " ".join(t.rows["id"]) + " ".join(t.rows["path"])
    assert with_rel_paths(t.rows, t.root).set_index("id").loc["a/link.png", "rel_path"] == "a/link.png"
    # a manifest naming a file outside its folder: today's absolute id and path, with one warning
    pd.DataFrame({"path": ["a/img0.png", "../outside/secret_DOE_JOHN.png"]}).to_csv(data / "m.csv", index=False)
    with caplog.at_level("WARNING", logger="retrieval.data.dataset"):
        t = load_dataset(data / "m.csv")
    assert t.rows["id"].tolist() == ["a/img0.png", str(secret.resolve())]
    assert with_rel_paths(t.rows, t.root)["rel_path"].isna().tolist() == [False, True]
    assert "1 image(s) lie outside the data root" in caplog.text and "secret" not in caplog.text


def test_dataset_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetrieveError, match="empty folder"):
        load_dataset(tmp_path / "empty")
    pd.DataFrame({"file": ["a.png"]}).to_csv(tmp_path / "nocol.csv", index=False)
    with pytest.raises(RetrieveError, match="missing the required column 'path'"):
        load_dataset(tmp_path / "nocol.csv")
    pd.DataFrame({"path": ["a.png"], "label": ["x"]}).to_csv(tmp_path / "allmissing.csv", index=False)
    with pytest.raises(RetrieveError, match="no readable image files"):
        load_dataset(tmp_path / "allmissing.csv")
    with pytest.raises(RetrieveError, match="no such file"):
        load_dataset(tmp_path / "nowhere")


def test_dicom_clip_expands_to_frames_with_patient_id(tmp_path):
    write_dicom(
        tmp_path / "us" / "clip.dcm",
        np.random.default_rng(0).integers(0, 999, (4, 12, 12)).astype(np.uint16),
        patient_id="P77",
    )
    write_dicom(tmp_path / "us" / "still.dcm", np.ones((12, 12), np.uint16), patient_id=None)
    t = load_dataset(tmp_path)
    clip = t.rows[t.rows["id"].str.startswith("us/clip.dcm")]
    assert clip["id"].tolist() == [f"us/clip.dcm#{i}" for i in range(4)]
    assert clip["frame_index"].tolist() == [0, 1, 2, 3]
    assert set(clip["patient_id"]) == {"P77"}
    assert pd.isna(t.rows.loc[t.rows["id"] == "us/still.dcm", "patient_id"]).all()
    ds = FrameDataset(t.rows, PreprocessConfig(image_size=16))
    tensors = [ds[i][0] for i in range(len(ds))]
    assert all(x is not None and x.shape == (1, 16, 16) for x in tensors)
    assert not np.allclose(tensors[0].numpy(), tensors[1].numpy())


# --- DICOM archives: recognised by content, identity columns, pydicom LUTs ------------------------


def _linear_window(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), written out: output share 0..1 of the window's range."""
    return np.clip((x - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _to_uint8(share: np.ndarray) -> np.ndarray:
    return np.floor(share * 255.0 + 0.5).astype(np.uint8)


def test_dicom_window_matches_the_standard_formula(tmp_path):
    from dicom_factory import make_dicom

    x = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    p = make_dicom(tmp_path / "w", x, window=(1000, 500))
    got = read_frame(p).astype(int)
    want = _to_uint8(_linear_window(x.astype(float), 1000, 500)).astype(int)
    assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.99
    assert got[0, 0] == 0 and got[-1, -1] == 255
    # with a rescale (slope 2, intercept -1000) the window applies to the rescaled values
    r = make_dicom(tmp_path / "r", x, window=(1000, 500), rescale=(2.0, -1000.0), modality="CT")
    got = read_frame(r, ct_window=(-1, 1)).astype(int)  # the file's own window wins over the CT fallback
    want = _to_uint8(_linear_window(x * 2.0 - 1000.0, 1000, 500)).astype(int)
    assert np.abs(got - want).max() <= 1
    # MONOCHROME1: the same window, inverted
    inv = make_dicom(tmp_path / "inv", x, window=(1000, 500), photometric="MONOCHROME1")
    assert (read_frame(inv).astype(int) == 255 - read_frame(p).astype(int)).all()


def test_dicom_voi_lut_sequence_matches_a_lookup(tmp_path):
    from dicom_factory import make_dicom

    x = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    first = 100
    lut = (np.sqrt(np.linspace(0, 1, 2000)) * 60000).astype(np.uint16)  # a non-linear LUT
    p = make_dicom(tmp_path / "lut", x, voi_lut=(first, lut), window=(10, 2))  # the LUT is preferred to the window
    got = read_frame(p).astype(int)
    y = lut[np.clip(x.astype(int) - first, 0, len(lut) - 1)].astype(float)
    want = _to_uint8((y - lut.min()) / (lut.max() - lut.min())).astype(int)
    assert np.abs(got - want).max() <= 1
    assert got[0, 0] == 0 and got[-1, -1] == 255 and len(np.unique(got)) > 100


def test_dicom_without_voi_keeps_the_ct_window_and_the_clip_range(tmp_path):
    from dicom_factory import make_dicom

    hu = np.array([[-1000, -100, 150, 400, 1000]], np.int32)
    p = make_dicom(tmp_path / "ct", (hu + 1024).astype(np.uint16), modality="CT", rescale=(1.0, -1024.0))
    assert read_frame(p)[0].tolist() == [0, 0, 128, 255, 255]
    clip = np.stack([np.full((8, 8), v, np.uint16) for v in (0, 100, 200)])
    clip[:, 0, 0] = 300
    c = make_dicom(tmp_path / "clip", clip)
    assert [int(read_frame(c, i)[5, 5]) for i in range(3)] == [0, 85, 170]  # one range for the clip


def test_dicom_recognised_by_content_not_suffix(tmp_path):
    from dicom_factory import make_dicom

    from retrieval.data.imageio import is_dicom, is_image_file

    img = np.arange(64, dtype=np.uint16).reshape(8, 8)
    with_preamble = make_dicom(tmp_path / "IM0001", img)
    uid_name = make_dicom(tmp_path / "1.2.840.99.7", img)
    bare = make_dicom(tmp_path / "IM0002", img, preamble=False)
    assert bare.read_bytes()[128:132] != b"DICM" and bare.read_bytes()[:2] == b"\x08\x00"
    (tmp_path / "README").write_text("not dicom\n" * 20)
    (tmp_path / "blob.bin").write_bytes(b"\x08\x00" + bytes(300))  # starts like DICOM, is not
    for p in (with_preamble, uid_name, bare):
        assert is_dicom(p) and is_image_file(p)
        assert read_frame(p)[0, :3].tolist() == [0, 4, 8]
    assert not is_image_file(tmp_path / "README") and not is_image_file(tmp_path / "blob.bin")


def test_dicom_identity_columns_and_no_pixels(tmp_path):
    from dicom_factory import make_dicom

    from retrieval.data.dicom import read_dicom_header

    p = make_dicom(tmp_path / "a", np.zeros((4, 4), np.uint16), "P9", "1.2.3", "1.2.3.4", accession="A77")
    h = read_dicom_header(p)
    assert h.identity["patient_id"] == "P9" and h.identity["study_uid"] == "1.2.3"
    assert h.identity["series_uid"] == "1.2.3.4" and h.identity["accession"] == "A77"
    assert h.identity["modality"] == "US" and h.identity["body_part"] == "ABDOMEN"
    assert h.identity["study_date"] == "20240131" and h.identity["sop_uid"]
    assert "Doe" not in repr(h)  # PatientName is never read into anything
    sr = make_dicom(tmp_path / "sr", np.zeros((4, 4), np.uint16), pixels=False)
    with pytest.raises(UnreadableImageError, match="without pixel data"):
        read_dicom_header(sr)
    with pytest.raises(UnreadableImageError, match="without pixel data"):
        read_frames(sr)


def test_pacs_tree_is_read_without_labels_with_identity_columns(tmp_path):
    from dicom_factory import make_pacs_tree

    files = make_pacs_tree(tmp_path)
    t = load_dataset(tmp_path)
    rows = t.rows
    assert rows["label"].isna().all()  # PAT/STUDY/SERIES folders are not classes
    assert set(rows["patient_id"]) == {"PAT001", "PAT002", "PAT003"}
    for col in ("study_uid", "series_uid", "sop_uid", "modality", "body_part", "study_date", "accession"):
        assert col in rows.columns
    assert rows["study_uid"].nunique() == 4 and rows["series_uid"].nunique() == 9
    assert len(rows) == 18 + 3 + 1 + 1 + 1  # 18 stills, a 3-frame clip, MONOCHROME1, VOI LUT, bare
    assert [s.path for s in t.skipped] == [str(files["report"].resolve())]
    assert "Doe" not in rows.to_csv()


def test_patient_named_folders_are_not_labels(tmp_path):
    from dicom_factory import make_dicom

    for pid in ("PAT1", "PAT2"):
        make_dicom(tmp_path / pid / "IM0001", np.zeros((4, 4), np.uint16), pid)
    rows = load_dataset(tmp_path).rows
    assert rows["label"].isna().all() and sorted(rows["patient_id"]) == ["PAT1", "PAT2"]


def test_rle_decodes_and_missing_plugin_is_named(tmp_path):
    import pydicom
    from dicom_factory import make_dicom
    from pydicom.encaps import encapsulate
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import JPEGLSLossless, RLELossless

    img = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 16) % 4096
    plain = make_dicom(tmp_path / "plain", img)
    ds = pydicom.dcmread(plain)
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle")
    assert (read_frame(tmp_path / "rle") == read_frame(plain)).all()
    ds = pydicom.dcmread(plain)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(64) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "jls")
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    with pytest.raises(UnreadableImageError, match="pip install pylibjpeg pylibjpeg-libjpeg") as info:
        read_frame(tmp_path / "jls")
    assert "\n" not in str(info.value) and "JPEG-LS" in str(info.value)
