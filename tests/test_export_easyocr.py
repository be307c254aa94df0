"""The exported bundle loads in the real easyocr.Reader and reads what `kocr predict` reads."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evaluation.reader import DetectorSettings
from kocr.easyocr_compat import import_easyocr, offline_model_dir
from kocr.params import load_params
from tests.conftest import realdata
from training.checkpoint import load_recognizer
from training.export_easyocr import DETECTOR, ExportError, export_easyocr

HANGUL = range(0xAC00, 0xD7A4)


# the detector settings `kocr predict` reads here (params.yaml), as `kocr export-easyocr` passes them
SETTINGS = DetectorSettings.from_params(load_params()["detector"]).changed()


@pytest.fixture(scope="module")
def bundle(hangul_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    export_easyocr(str(hangul_checkpoint), out, "ko_test", with_detector=True, readtext_kwargs=SETTINGS)
    return out


def _reader(bundle, quantize: bool):
    easyocr = import_easyocr()
    return easyocr.Reader(["ko", "en"], gpu=False, model_storage_directory=str(bundle / "model"),
                          user_network_directory=str(bundle / "user_network"), recog_network="ko_test",
                          download_enabled=False, quantize=quantize, verbose=False)


def test_bundle_files_follow_easyocr_contract(bundle, hangul_checkpoint):
    state = torch.load(bundle / "model" / "ko_test.pth", map_location="cpu", weights_only=True)
    assert all(k.startswith("module.") for k in state)
    original = load_recognizer(str(hangul_checkpoint))
    for key, value in original.model.state_dict().items():
        assert torch.equal(state[f"module.{key}"], value), key
    config = yaml.safe_load((bundle / "user_network" / "ko_test.yaml").read_text(encoding="utf-8"))
    assert config["imgH"] == 64
    assert config["network_params"] == {"input_channel": 1, "output_channel": 256, "hidden_size": 256}
    assert config["character_list"] == original.charset.chars
    assert set(config["lang_list"]) >= {"ko"}


def test_readme_passes_the_detector_settings_the_platform_evaluated_with(bundle, hangul_checkpoint, tmp_path):
    assert SETTINGS, "params.yaml's detector: keeps EasyOCR's defaults; this test then checks nothing"
    call = "".join(f", {k}={v!r}" for k, v in SETTINGS.items())
    assert f'reader.readtext("page.jpg"{call})' in (bundle / "README.md").read_text(encoding="utf-8")
    plain = tmp_path / "plain"
    export_easyocr(str(hangul_checkpoint), plain, "ko_test")
    assert 'reader.readtext("page.jpg")' in (plain / "README.md").read_text(encoding="utf-8")


def _kocr_predict(image, checkpoint, tmp_path) -> list[dict]:
    out = tmp_path / "pred"
    subprocess.run([sys.executable, "-m", "kocr.cli", "predict", str(image), "--model", str(checkpoint),
                    "--out", str(out)], check=True, capture_output=True, text=True)
    page = json.loads(next(out.glob("*.json")).read_text(encoding="utf-8"))
    return page["annotations"]


def _assert_same_reading(easyocr_result, annotations):
    assert len(easyocr_result) == len(annotations) > 0
    for (quad, text, _), ann in zip(easyocr_result, annotations):
        xs, ys = [p[0] for p in quad], [p[1] for p in quad]
        assert ann["annotation.bbox"] == pytest.approx([min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)])
        assert ann["annotation.text"] == text


def test_reader_reads_like_kocr_predict_on_generated_page(bundle, hangul_checkpoint, sample_pages, tmp_path):
    image = sorted(sample_pages.glob("*.jpg"))[0]
    result = _reader(bundle, quantize=False).readtext(str(image), **SETTINGS)  # as the bundle's README says
    annotations = _kocr_predict(image, hangul_checkpoint, tmp_path)
    _assert_same_reading(result, annotations)
    # the comparison means something only if Hangul classes were read, i.e. the charset order was exercised
    assert any(ord(c) in HANGUL for _, text, _ in result for c in text)


def test_reader_reads_like_kocr_predict_on_real_photo(bundle, hangul_checkpoint, tmp_path):
    from PIL import Image

    # the sign's rounded corners are transparent (stored black), which the platform lays over white and
    # EasyOCR does not (the README's snippet saves such a page as the platform reads it): its opaque copy
    # is an ordinary 8-bit image, which both read alike
    image = tmp_path / "korean.png"
    Image.open(realdata("easyocr", "korean.png")).convert("RGB").save(image)
    result = _reader(bundle, quantize=False).readtext(str(image), **SETTINGS)
    _assert_same_reading(result, _kocr_predict(image, hangul_checkpoint, tmp_path))


def test_quantized_reader_still_loads_the_bundle(bundle, sample_pages):
    image = sorted(sample_pages.glob("*.jpg"))[1]
    texts = [t for _, t, _ in _reader(bundle, quantize=True).readtext(str(image))]
    assert texts  # EasyOCR's default CPU int8 path runs on the bundle; parity is checked unquantized


def _counting_flatten(monkeypatch) -> list:
    """The LSTMs whose ``flatten_parameters`` runs while the test does (it still runs)."""
    flattened: list = []
    real = torch.nn.LSTM.flatten_parameters

    def spy(self):
        flattened.append(self)
        return real(self)

    monkeypatch.setattr(torch.nn.LSTM, "flatten_parameters", spy)
    return flattened


def test_the_bundles_bilstms_flatten_their_weights_on_each_forward_as_easyocrs_do(bundle, monkeypatch):
    # EasyOCR wraps the recogniser in torch.nn.DataParallel on GPU, whose replicas' LSTM weights are
    # not one block: its own BiLSTM calls flatten_parameters in forward, and the bundle's must too
    reader = _reader(bundle, quantize=False)
    lstms = [m for m in reader.recognizer.modules() if isinstance(m, torch.nn.LSTM)]
    assert len(lstms) == 2
    forwards: list = []
    reader.recognizer.register_forward_hook(lambda *_: forwards.append(1))
    flattened = _counting_flatten(monkeypatch)
    crop = np.full((64, 200), 255, np.uint8)
    crop[20:44, 30:170] = 0
    reader.recognize(crop)
    assert forwards  # EasyOCR reads a crop twice when the first reading is unsure (contrast raised)
    assert [id(m) for m in flattened] == [id(m) for m in lstms] * len(forwards)


def test_the_int8_quantized_bundle_reads_without_flattening(bundle, monkeypatch):
    # EasyOCR's default on CPU: its dynamic int8 LSTM has no flatten_parameters, which must not fail
    reader = _reader(bundle, quantize=True)
    rnns = [m.rnn for m in reader.recognizer.SequenceModeling]
    assert all(not isinstance(r, torch.nn.LSTM) and not hasattr(r, "flatten_parameters") for r in rnns)
    flattened = _counting_flatten(monkeypatch)
    crop = np.full((64, 200), 255, np.uint8)
    crop[20:44, 30:170] = 0
    assert len(reader.recognize(crop)) == 1
    assert flattened == []


def test_export_refuses_rgb_models(tmp_path):
    from training.charset import Charset
    from training.checkpoint import save_checkpoint
    from training.model import Recognizer, RecognizerConfig

    path = tmp_path / "rgb.pt"
    save_checkpoint(path, Recognizer(RecognizerConfig(num_class=97, input_channel=3)), Charset.named("english_g2"))
    with pytest.raises(ExportError, match="greyscale"):
        export_easyocr(str(path), tmp_path / "out", "rgb")


def test_export_with_detector_copies_craft(bundle):
    assert (bundle / "model" / "craft_mlt_25k.pth").stat().st_size == \
        (shutil.os.path.getsize(f"{offline_model_dir()}/craft_mlt_25k.pth"))


def test_parity_report_on_every_ground_truth_crop(bundle, hangul_checkpoint, sample_pages):
    from evaluation.evaluate import EvalPage
    from evaluation.parity import easyocr_parity
    from training.data.pages import read_page

    pages = [EvalPage(p.name, read_page(p), p.with_suffix(".jpg")) for p in sorted(sample_pages.glob("*.json"))[:2]]
    report = easyocr_parity(bundle, "ko_test", load_recognizer(str(hangul_checkpoint)), pages)
    expected = sum(1 for item in pages for w in item.page.words if w.text.strip())
    assert report["crops"] == expected > 0
    assert report["float_agreement"] == 1.0 and report["float_differences"] == 0
    # int8 changes some readings of an untrained head; the report counts and lists each one
    assert report["int8_differences"] == round((1 - report["int8_agreement"]) * expected)
    assert len([d for d in report["differences"] if d["quantized"] == "True"]) == min(report["int8_differences"], 50)


@pytest.mark.parametrize("name, words", [
    ("korean_g2", "one of EasyOCR's own models"),  # Reader would load (or download) its stock korean_g2.pth
    ("standard", "one of EasyOCR's own models"),
    # was exported: Reader reads generation1.yaml, then builds easyocr.model.model (512/512) instead of the
    # bundle's generation1.py and fails on its weights; generation2 builds vgg_model with 256/256 whatever it holds
    ("generation1", "the name EasyOCR gives its own network code.*easyocr.model.model"),
    ("generation2", "the name EasyOCR gives its own network code.*easyocr.model.vgg_model"),
    ("test", "already an importable module"),  # the standard library's test package would be imported
    # was "must be a Python identifier", which ko-ocr need not be (it loads: below); a '.' is why it fails
    ("ko.ocr", r"a '\.' in it: EasyOCR imports user_network/NAME.py with importlib.import_module\(NAME\), which "
               r"reads 'ko\.ocr' as module 'ocr' of a package 'ko'"),
    ("ko/ocr", "a folder separator in it"),
    ("ko ocr", "' ' in it: the bundle README's copy commands"),
    # was exported: model/NAME.pth is the file of EasyOCR's own model, which --with-detector copied over the
    # recogniser's weights (craft_mlt_25k), or which replaces (and is replaced by) korean_g1's korean.pth in
    # ~/.EasyOCR/model, EasyOCR deleting the file whose checksum is not its own and downloading its own
    ("craft_mlt_25k", "the file of EasyOCR's own craft model"),
    ("korean", "the file of EasyOCR's own korean_g1 model"),
    # was exported: on macOS and Windows Korean_G2.pth is korean_g2.pth in ~/.EasyOCR/model
    ("Korean_G2", "ignores case.*korean_g2.pth.*EasyOCR's own korean_g2 model"),
    ("CRAFT_mlt_25k", "ignores case.*EasyOCR's own craft model"),
])
def test_a_bundle_name_easyocr_would_not_load_as_this_bundle_is_refused(hangul_checkpoint, tmp_path, name, words):
    with pytest.raises(ExportError, match=words):
        export_easyocr(str(hangul_checkpoint), tmp_path / "out", name)
    assert not (tmp_path / "out").exists()


def test_a_dashed_bundle_name_is_exported_and_loads_in_easyocr(hangul_checkpoint, tmp_path, capsys):
    """`kocr export-easyocr --name ko-ocr` was refused as "must be a Python identifier (EasyOCR imports
    NAME.py)"; EasyOCR imports it with importlib.import_module, which takes the dashed file name."""
    from kocr.cli import main

    out = tmp_path / "b"
    assert main(["export-easyocr", "--model", str(hangul_checkpoint), "--out", str(out), "--name", "ko-ocr"]) == 0
    easyocr = import_easyocr()
    reader = easyocr.Reader(["ko", "en"], gpu=False, model_storage_directory=str(out / "model"),
                            user_network_directory=str(out / "user_network"), recog_network="ko-ocr",
                            detector=False, download_enabled=False, quantize=False, verbose=False)
    assert type(reader.recognizer).__module__ == "ko-ocr"
    crop = np.full((64, 160), 255, np.uint8)
    crop[20:44, 20:140] = 0
    assert len(reader.recognize(crop)) == 1
    assert main(["export-easyocr", "--model", str(hangul_checkpoint), "--out", str(tmp_path / "c"),
                 "--name", "ko.ocr"]) == 2
    assert "module 'ocr' of a package 'ko'" in capsys.readouterr().err


def test_a_bundle_name_beginning_with_a_dash_is_refused_saying_so(tmp_path, monkeypatch, capsys):
    """`kocr export-easyocr --name -x` failed with argparse's "argument --name: expected one argument" (one
    was there: argparse takes -x for an option), as did dvc.yaml's export stage (`--name ${export.name}`)
    with export.name -x; `--name=-x` exported it. A name beginning with '-' is refused by the name rules,
    saying so, however it is given, before the model loads; `--name` followed by one of its options (the
    name left out) keeps argparse's error."""
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["export-easyocr", "--model", "never-loaded.pt", "--out", "b"]
    said = ("kocr export-easyocr: error: bundle name '-x': begins with '-', which kocr export-easyocr --name "
            "(dvc.yaml's export stage passes --name ${export.name}) and shell commands given NAME.pth take for an "
            "option; pick another, e.g. ko_ocr")
    for name in (["--name", "-x"], ["--name=-x"], ["--nam", "-x"]):
        assert main([*args, *name, "--with-detector"]) == 2
        assert capsys.readouterr().err.strip() == said, name
    (tmp_path / "params.yaml").write_text("export:\n  name: -x\n", encoding="utf-8")
    assert main(args) == 2 and capsys.readouterr().err.strip() == said
    with pytest.raises(SystemExit):
        main([*args, "--name", "--with-detector"])
    assert "argument --name: expected one argument" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_export_settings_mistakes_are_one_line_and_write_nothing(hangul_checkpoint, tmp_path, monkeypatch, capsys):
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["export-easyocr", "--model", str(hangul_checkpoint), "--out", "b"]
    for lang_list, words in (("ko", "export.lang_list: expected a list of EasyOCR language codes"),
                             ("[ko, kr]", "export.lang_list ['ko', 'kr']: not EasyOCR language codes: ['kr']")):
        (tmp_path / "params.yaml").write_text(f"export:\n  lang_list: {lang_list}\n", encoding="utf-8")
        assert main(args) == 2 and words in capsys.readouterr().err
    (tmp_path / "params.yaml").write_text("export: {}\n", encoding="utf-8")
    (tmp_path / "afile").write_text("")
    assert main([*args[:-1], "afile"]) == 2
    assert capsys.readouterr().err.strip() == "kocr export-easyocr: error: --out afile: exists and is not a folder"
    # a parity check with no pages to read would report 100% agreement on nothing
    assert main([*args, "--parity-source", "pages"]) == 2
    assert "--parity-source needs --splits" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_bundle_exported_from_the_registry_names_the_version_it_holds(hangul_checkpoint, tmp_path, monkeypatch):
    import mlflow

    from evaluation.pyfunc_model import log_recognizer
    from kocr.cli import main
    from kocr.tracking import configure_tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    configure_tracking()
    with mlflow.start_run() as run:
        uri = log_recognizer(hangul_checkpoint, DetectorSettings()).model_uri
    version = mlflow.register_model(uri, "ko-export-test").version
    mlflow.MlflowClient().set_registered_model_alias("ko-export-test", "champion", version)
    assert main(["export-easyocr", "--model", "models:/ko-export-test@champion", "--out", "b"]) == 0
    said = (f"models:/ko-export-test@champion, ko-export-test version {version} (run {run.info.run_id}), "
            f"checkpoint sha256 {hashlib.sha256(hangul_checkpoint.read_bytes()).hexdigest()}")
    assert f"from {said} (" in (tmp_path / "b" / "README.md").read_text(encoding="utf-8")
    network = (tmp_path / "b" / "user_network" / "ko_ocr.yaml").read_text(encoding="utf-8")
    assert network.startswith(f"# exported by kocr export-easyocr from {said}\n")
    assert yaml.safe_load(network)["lang_list"] == ["ko", "en"]  # the comment leaves EasyOCR's keys as they were


def test_a_checkpoint_given_by_absolute_path_is_named_by_its_file_name_in_the_bundle(hangul_checkpoint, tmp_path,
                                                                                      monkeypatch):
    """`--model /abs/folders/model.pt` was written whole into the README and the yaml's comment: where
    the user keeps their files, wrong on another machine. Now its file name, with the sha256."""
    from kocr.cli import main

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    kept = tmp_path / "private" / "ckpts" / "best.pt"
    kept.parent.mkdir(parents=True)
    shutil.copy(hangul_checkpoint, kept)
    assert main(["export-easyocr", "--model", str(kept), "--out", "b"]) == 0
    said = f"from best.pt, checkpoint sha256 {hashlib.sha256(kept.read_bytes()).hexdigest()}"
    readme = (work / "b" / "README.md").read_text(encoding="utf-8")
    network = (work / "b" / "user_network" / "ko_ocr.yaml").read_text(encoding="utf-8")
    assert f"{said} (" in readme and network.startswith(f"# exported by kocr export-easyocr {said}\n")
    assert str(tmp_path) not in readme + network and "private" not in readme + network
    inside = work / "models" / "m.pt"  # inside the working folder: its path there, given absolute or not
    inside.parent.mkdir()
    shutil.copy(hangul_checkpoint, inside)
    assert main(["export-easyocr", "--model", str(inside), "--out", "c"]) == 0
    assert "from models/m.pt, checkpoint sha256" in (work / "c" / "README.md").read_text(encoding="utf-8")


def test_the_bundle_readmes_upright_snippet_saves_what_the_platform_reads(tmp_path, monkeypatch):
    import cv2
    import numpy as np
    from PIL import Image

    from evaluation.reader import load_image
    from training.export_easyocr import UPRIGHT_SNIPPET

    grey = np.full((40, 90), 235, np.uint8)
    grey[12:28, 10:80] = 30  # a dark bar to read
    pages = {"exif.jpg": None, "deep.png": Image.fromarray(grey.astype(np.uint16) * 257),
             "deep8.png": Image.fromarray(grey.astype(np.uint16)),  # 16-bit file, 8-bit values: was saved black
             "float.tif": Image.fromarray(grey.astype(np.float32) / 255),  # mode F in 0-1
             "alpha.png": Image.fromarray(np.dstack([np.zeros((40, 90, 3), np.uint8), 255 - grey]), "RGBA"),
             "cutout.png": Image.fromarray(np.dstack([np.where(grey[..., None] < 100, (20, 20, 90), 0),  # ink kept,
                                                      np.where(grey < 100, 255, 0)]).astype(np.uint8), "RGBA"),  # paper cleared
             "cmyk.jpg": Image.fromarray(np.dstack([np.zeros((40, 90, 3), np.uint8), 255 - grey]), "CMYK"),
             "bilevel.png": Image.fromarray(grey).convert("1")}
    palette = Image.fromarray(255 - grey, "P")  # pngquant-style: one black colour, index i drawn at alpha i
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = bytes(range(256))
    pages["palette.png"] = palette
    turned = Image.fromarray(np.rot90(grey).copy()).convert("RGB")
    exif = turned.getexif()
    exif[0x0112] = 6  # stored sideways, shown upright
    turned.save(tmp_path / "exif.jpg", exif=exif, quality=95)
    monkeypatch.chdir(tmp_path)
    for name, image in pages.items():
        if image is not None:
            image.save(tmp_path / name, **({"transparency": image.info["transparency"]} if image.mode == "P" else {}))
        exec(UPRIGHT_SNIPPET.replace('"photo.jpg"', repr(name)), {})  # the README's code, as a user runs it
        saved = cv2.imread(str(tmp_path / "upright.png"), cv2.IMREAD_GRAYSCALE)  # what EasyOCR reads by path
        platform = load_image(tmp_path / name)[1]
        assert saved.shape == platform.shape, name
        assert np.abs(saved.astype(int) - platform.astype(int)).max() <= 1, name  # the array advice was all white or black


def test_an_export_that_fails_part_way_leaves_the_earlier_bundle_whole(hangul_checkpoint, tmp_path, monkeypatch):
    from training import export_easyocr as exporter

    out = tmp_path / "bundle"
    export_easyocr(str(hangul_checkpoint), out, "ko_partway")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    real_write_text = Path.write_text

    def killed_at_the_yaml(self, *args, **kwargs):  # after the new .pth is written, as a kill would
        if self.suffix == ".yaml":
            raise KeyboardInterrupt
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed_at_the_yaml)
    with pytest.raises(KeyboardInterrupt):
        export_easyocr("ko_base", out, "ko_partway")
    monkeypatch.setattr(Path, "write_text", real_write_text)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # was: ko_base's weights in ko_partway.pth beside the earlier yaml and README

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # no file name, as a plain write gives

    monkeypatch.setattr(exporter.torch, "save", full)
    with pytest.raises(OSError) as info:
        export_easyocr("ko_base", out, "ko_partway")
    assert info.value.filename == str(out / "model" / "ko_partway.pth")  # was: README.md, the last one staged


def _files(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_kill_while_the_bundle_is_published_leaves_the_earlier_bundle_or_the_new_one(hangul_checkpoint, tmp_path,
                                                                                       monkeypatch):
    """Was: each file was renamed in on its own, so a SIGTERM (an exit in kocr) after the README's rename
    left the new README and yaml beside the earlier export's weights: a bundle that loads one model
    under another's provenance."""
    from tests.conftest import interrupted_rename

    new = tmp_path / "new"
    export_easyocr("ko_base", new, "ko_kill", with_detector=True)
    for kill_after in range(1, 10):
        out = tmp_path / f"bundle{kill_after}"
        export_easyocr(str(hangul_checkpoint), out, "ko_kill")
        before = _files(out)
        try:  # SIGTERM lands right after this rename
            with interrupted_rename(monkeypatch, kill_after) as renames:
                export_easyocr("ko_base", out, "ko_kill", with_detector=True)
        except SystemExit:
            pass
        after = _files(out)
        assert after in (before, _files(new)), f"killed after rename {kill_after} of {len(renames)}"
        if len(renames) < kill_after:  # the export ended before this kill: every point was tried
            assert after == _files(new)
            break
    else:
        raise AssertionError("the export never finished")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing hidden left beside


def test_a_folder_holding_more_than_the_bundle_is_refused_never_replaced(hangul_checkpoint, tmp_path,
                                                                          monkeypatch):
    """The export replaces its folder whole: a folder with other files (stock models in ~/.EasyOCR,
    another bundle, a project's README) is refused before anything is written; one holding the same
    bundle, with the __pycache__ EasyOCR's import of NAME.py leaves, is replaced."""
    from kocr.atomic import OutFolderError

    out = tmp_path / "bundle"
    export_easyocr(str(hangul_checkpoint), out, "ko_own", with_detector=True)
    (out / "user_network" / "__pycache__").mkdir()
    (out / "user_network" / "__pycache__" / "ko_own.cpython-311.pyc").write_bytes(b"compiled")
    craft = (out / "model" / "craft_mlt_25k.pth").read_bytes()
    export_easyocr("ko_base", out, "ko_own")  # replaced whole: no stale bytecode; the detector it held is kept
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "model/craft_mlt_25k.pth", "model/ko_own.pth", "user_network/ko_own.py",
        "user_network/ko_own.yaml"]
    assert (out / "model" / "craft_mlt_25k.pth").read_bytes() == craft  # the Reader still finds CRAFT offline
    (out / "model" / "craft_mlt_25k.pth").unlink()
    export_easyocr("ko_base", out, "ko_own")
    assert not (out / "model" / "craft_mlt_25k.pth").exists()  # none is added without --with-detector
    before = _files(out)
    for extra in ("model/korean_g2.pth", "notes.txt", "user_network/other.yaml"):
        (out / extra).write_bytes(b"keep me")
        with pytest.raises(OutFolderError, match=f"holds '{extra}' \\(1 such\\), which an export of ko_own"):
            export_easyocr(str(hangul_checkpoint), out, "ko_own")
        assert _files(out) == {**before, Path(extra): b"keep me"}
        (out / extra).unlink()
    with pytest.raises(OutFolderError, match="holds 'model/ko_own.pth'"):  # another bundle's folder
        export_easyocr(str(hangul_checkpoint), out, "ko_other")
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(OutFolderError, match="a symbolic link"):
        export_easyocr(str(hangul_checkpoint), tmp_path / "link", "ko_own")
    (tmp_path / "models").mkdir()
    (out / "model").rename(tmp_path / "models" / "model")
    (out / "model").symlink_to(tmp_path / "models" / "model")  # model/ kept on another disk
    with pytest.raises(OutFolderError, match="holds 'model'"):
        export_easyocr(str(hangul_checkpoint), out, "ko_own")
    (out / "model").unlink()
    (tmp_path / "models" / "model").rename(out / "model")
    monkeypatch.chdir(out / "model")
    with pytest.raises(OutFolderError, match="the working folder"):
        export_easyocr(str(hangul_checkpoint), out, "ko_own")
    assert _files(out) == before
    monkeypatch.chdir(tmp_path)
    cached = (out / "model" / "ko_own.pth").rename(tmp_path / "cached.pth")
    (out / "model" / "ko_own.pth").symlink_to(cached)  # as `dvc checkout` links files from its cache
    export_easyocr(str(hangul_checkpoint), out, "ko_own")
    assert not (out / "model" / "ko_own.pth").is_symlink() and cached.read_bytes() == before[Path("model/ko_own.pth")]


def test_the_cli_checks_the_bundle_settings_once_and_before_the_model_loads(hangul_checkpoint, tmp_path, monkeypatch):
    """Was: ``kocr export-easyocr`` checked ``--out`` and ``export.lang_list`` before loading the model and
    ``export_easyocr`` checked them again after; the bundle's name was checked only after the load."""
    import training.checkpoint
    import training.export_easyocr as export_module
    from kocr.cli import main

    calls: list[str] = []

    def spy(name, real):
        return lambda *args, **kwargs: calls.append(name) or real(*args, **kwargs)

    for name in ("check_out", "check_langs", "check_bundle_name"):
        monkeypatch.setattr(export_module, name, spy(name, getattr(export_module, name)))
    monkeypatch.setattr(training.checkpoint, "load_recognizer",
                        spy("load_recognizer", training.checkpoint.load_recognizer))
    monkeypatch.chdir(tmp_path)
    assert main(["export-easyocr", "--model", str(hangul_checkpoint), "--out", "b"]) == 0
    assert sorted(calls[:3]) == ["check_bundle_name", "check_langs", "check_out"]
    assert calls[3:] == ["load_recognizer"]
    assert (tmp_path / "b" / "model" / "ko_ocr.pth").is_file()
    calls.clear()
    assert main(["export-easyocr", "--model", str(hangul_checkpoint), "--out", "b2", "--name", "english_g2"]) == 2
    assert calls == ["check_bundle_name"]  # refused before the model loads
    assert not (tmp_path / "b2").exists()


def test_a_logged_models_own_detector_settings_go_into_the_bundle_readme(hangul_checkpoint, tmp_path, monkeypatch,
                                                                         capsys):
    """Was: the README's readtext call took params.yaml's detector: section, or EasyOCR's defaults where the
    export ran without one, also for a models:/ model logged with other settings (those it serves with and
    `kocr predict` reads it with)."""
    import mlflow

    from evaluation.pyfunc_model import log_recognizer
    from kocr.cli import main
    from kocr.tracking import configure_tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    configure_tracking()
    with mlflow.start_run():
        uri = log_recognizer(hangul_checkpoint, DetectorSettings(width_ths=0.0, text_threshold=0.6)).model_uri
    version = mlflow.register_model(uri, "ko-settings-test").version
    logged_call = 'reader.readtext("page.jpg", text_threshold=0.6, width_ths=0.0)'
    # outside the project (no params.yaml): the model's own settings, and no note that defaults were used
    assert main(["export-easyocr", "--model", f"models:/ko-settings-test/{version}", "--out", "a"]) == 0
    readme = (tmp_path / "a" / "README.md").read_text(encoding="utf-8")
    assert logged_call in readme and "logged with this model in MLflow" in readme
    assert "default detector settings were used" not in capsys.readouterr().err
    # a params.yaml that says otherwise: the model's settings still, and stderr says so
    (tmp_path / "params.yaml").write_text("detector:\n  width_ths: 0.2\n", encoding="utf-8")
    assert main(["export-easyocr", "--model", f"runs:/{mlflow.last_active_run().info.run_id}/recognizer",
                 "--out", "b"]) == 0
    assert logged_call in (tmp_path / "b" / "README.md").read_text(encoding="utf-8")
    assert "(text_threshold=0.6, width_ths=0.0), not params.yaml's (width_ths=0.2)" in capsys.readouterr().err
    # a checkpoint records none: params.yaml's, or, without one, the README says the defaults are no one's choice
    assert main(["export-easyocr", "--model", str(hangul_checkpoint), "--out", "c"]) == 0
    assert 'reader.readtext("page.jpg", width_ths=0.2)' in (tmp_path / "c" / "README.md").read_text(encoding="utf-8")
    (tmp_path / "params.yaml").unlink()
    assert main(["export-easyocr", "--model", str(hangul_checkpoint), "--out", "d"]) == 0
    readme = (tmp_path / "d" / "README.md").read_text(encoding="utf-8")
    assert 'reader.readtext("page.jpg")' in readme and "The model records no detector settings" in readme


def test_the_bundle_readme_warns_off_rotation_info_and_its_page_turn_snippet_finds_the_upright_turn(tmp_path,
                                                                                                  monkeypatch):
    """Was: nothing said that ``readtext(rotation_info=[90, 180, 270])`` keeps a turned misreading of an
    upright word whenever it is more confident (5 of 12 upright real crops with ko_base: EasyOCR's
    confidence favours the one junk character a turned word reads as), nor how to find a page's turn."""
    import cv2
    from PIL import Image

    from training.export_easyocr import TURN_SNIPPET

    page = realdata("easyocr", "korean.png")
    export_easyocr("ko_base", tmp_path / "b", "ko_turns", with_detector=True, readtext_kwargs=SETTINGS)
    readme = (tmp_path / "b" / "README.md").read_text(encoding="utf-8")
    assert "Do not pass `rotation_info`" in readme
    snippet = TURN_SNIPPET.replace("READ_CALL", "".join(f", {k}={v!r}" for k, v in SETTINGS.items()))
    assert snippet in readme
    reader = import_easyocr().Reader(["ko", "en"], gpu=False, model_storage_directory=str(tmp_path / "b" / "model"),
                                     user_network_directory=str(tmp_path / "b" / "user_network"),
                                     recog_network="ko_turns", download_enabled=False, quantize=False, verbose=False)
    monkeypatch.chdir(tmp_path)
    for stored_turn, upright_turn in ((0, 0), (90, 270)):  # the page as stored, the turn that sets it upright
        Image.open(page).convert("RGB").rotate(stored_turn, expand=True).save(tmp_path / "page.jpg", quality=95)
        found: dict = {"reader": reader}
        exec(snippet, found)  # the README's code, as a user runs it
        assert found["turn"] == upright_turn
        texts = [text for _, text, _ in found["result"]]
        assert "평양" in texts and "Seoul" in texts, texts
        assert cv2.imread(f"turned_{upright_turn}.png").shape[:2] == cv2.imread(str(page)).shape[:2]


def test_an_export_stopped_in_its_parity_check_leaves_no_parity_of_the_earlier_bundle(hangul_checkpoint, sample_pages,
                                                                                      prepared, tmp_path, monkeypatch):
    """The export stage publishes the bundle, then checks its parity (minutes) and writes --metrics. Was: a
    SIGTERM (kocr's exit 143) or a failure in the check left the new bundle beside the earlier bundle's
    metrics/export.json, which DVC shows as the parity of the bundle there. Now --metrics is removed before
    the new bundle moves in, so an interrupted export has none; run again, it has the new bundle's."""
    import evaluation.parity
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("export: {name: ko_parity}\nevaluate: {split: val}\n", encoding="utf-8")
    shutil.copy(hangul_checkpoint, tmp_path / "second.pt")
    checked = []

    def parity(bundle, name, loaded, pages, margin):
        yaml_line = (Path(bundle) / "user_network/ko_parity.yaml").read_text(encoding="utf-8").splitlines()[0]
        checked.append(yaml_line)
        return {"crops": 1, "float_agreement": 1.0, "int8_agreement": 1.0, "checked": yaml_line}

    def export(model: str) -> int:
        return main(["export-easyocr", "--model", model, "--out", "bundle", "--parity-source", str(sample_pages),
                     "--splits", str(prepared / "splits.json"), "--metrics", "m/export.json"])

    monkeypatch.setattr(evaluation.parity, "easyocr_parity", parity)
    assert export(str(hangul_checkpoint)) == 0
    assert json.loads((tmp_path / "m/export.json").read_text())["checked"] == checked[0]

    def stopped(*args):
        raise SystemExit(143)  # what kocr makes of a SIGTERM

    monkeypatch.setattr(evaluation.parity, "easyocr_parity", stopped)
    with pytest.raises(SystemExit):
        export("second.pt")
    assert "second.pt" in (tmp_path / "bundle/user_network/ko_parity.yaml").read_text(encoding="utf-8")  # it is in
    assert not (tmp_path / "m/export.json").exists()  # was: the first bundle's parity beside the second bundle
    monkeypatch.setattr(evaluation.parity, "easyocr_parity", parity)
    assert export("second.pt") == 0
    assert "second.pt" in json.loads((tmp_path / "m/export.json").read_text())["checked"]


def _readme_copy_commands(bundle: Path) -> str:
    """The README's shell block that copies the bundle into ~/.EasyOCR."""
    readme = (bundle / "README.md").read_text(encoding="utf-8")
    return readme.split("Copy into EasyOCR's folders", 1)[1].split("```\n", 2)[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="the README's copy commands are POSIX shell")
@pytest.mark.parametrize("with_detector", [True, False])
def test_the_readmes_copy_commands_install_the_bundle_on_a_machine_without_easyocr_folders(
        hangul_checkpoint, tmp_path, with_detector):
    """Was: `cp model/NAME.pth ~/.EasyOCR/model/` failed where EasyOCR had never run (no ~/.EasyOCR yet),
    and a bundle exported --with-detector for an offline machine left its CRAFT weights behind, so
    easyocr.Reader went to download them."""
    out = tmp_path / "bundle"
    export_easyocr(str(hangul_checkpoint), out, "ko_copy", with_detector=with_detector)
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run(["bash", "-e", "-c", _readme_copy_commands(out)], cwd=out, capture_output=True, text=True,
                          env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    for folder in ("model", "user_network"):
        shipped = sorted(p.name for p in (out / folder).iterdir() if p.is_file())
        assert sorted(p.name for p in (home / ".EasyOCR" / folder).iterdir()) == shipped
    assert ((home / ".EasyOCR" / "model" / DETECTOR).is_file()) == with_detector


def test_a_charset_holding_next_line_u0085_reads_back_from_the_bundle_yaml(tmp_path):
    """Was: PyYAML writes U+0085 (NEL, the C1 line break; Latin-1-decoded CP1252 text turns an ellipsis
    into it) unescaped with allow_unicode, and its reader folds it to a space: EasyOCR read that class
    as " ", and with a space in the charset too the platform refused its own bundle (a repeated character)."""
    from training.charset import Charset
    from training.checkpoint import save_checkpoint
    from training.model import Recognizer, RecognizerConfig

    charset = Charset(Charset.named("english_g2").chars + "\x85\u2028가", "nel")
    path = tmp_path / "nel.pt"
    save_checkpoint(path, Recognizer(RecognizerConfig(num_class=charset.num_class)), charset)
    export_easyocr(str(path), tmp_path / "b", "ko_nel")
    text = (tmp_path / "b" / "user_network" / "ko_nel.yaml").read_text(encoding="utf8")
    assert yaml.load(text, Loader=yaml.FullLoader)["character_list"] == charset.chars  # as easyocr.Reader reads it
    assert load_recognizer(str(tmp_path / "b")).charset == charset
