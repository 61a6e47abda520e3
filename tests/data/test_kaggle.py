"""The Kaggle round trip against a fake at the KaggleApi boundary (no network here), on real archives."""

import http.server
import inspect
import io
import json
import logging
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import py7zr
import pytest
from snapshots import snapshot

from planet_batch.cli import main
from planet_batch.data import kaggle
from planet_batch.data.kaggle import COMPETITION, COMPETITION_FILES, ArchiveError, KaggleError, disk_budget, extract
from planet_batch.data.layout import find_layout, read_sample_submission
from planet_batch.data.layout import test_images as ordered_test_images

SECRET = "s3cr3t-kaggle-key-0123456789"


def build_competition_archives(demo_root, out):
    """The five competition files, built from a demo dataset the way Kaggle ships them."""
    out.mkdir()
    for csv_name in ("train_v2.csv", "sample_submission_v2.csv"):
        with zipfile.ZipFile(out / f"{csv_name}.zip", "w") as zf:
            zf.write(demo_root / csv_name, csv_name)
    for folder in ("train-jpg", "test-jpg", "test-jpg-additional"):
        tar_path = out / f"{folder}.tar"
        with tarfile.open(tar_path, "w") as tf:
            tf.add(demo_root / folder, arcname=folder)
        with py7zr.SevenZipFile(out / f"{folder}.tar.7z", "w") as z:
            z.write(tar_path, f"{folder}.tar")
        tar_path.unlink()
    return out


class FakeKaggleApi:
    """Stands where kaggle.api.kaggle_api_extended.KaggleApi stands, with its methods' signatures
    (test_the_fake_has_the_real_signatures), and writes as it does: a competition file under the name of its
    download URL (kaggle's own `_resolve_download_path`), large files wrapped in a zip (`NAME.zip`)."""

    WRAPPED = ("train-jpg.tar.7z", "test-jpg.tar.7z")  # served as NAME.zip, as Kaggle serves large files

    def __init__(self, archives):
        self.archives, self.calls = archives, []

    def competition_download_file(self, competition, file_name, path=None, force=False, quiet=False, unzip=False):
        from kaggle.api.kaggle_api_extended import _resolve_download_path

        self.calls.append(("competition_download_file", competition, file_name))
        wrapped = file_name in self.WRAPPED
        url = f"https://storage.example/{competition}/{file_name}{'.zip' if wrapped else ''}?X-Goog-Signature=abc"
        outfile = Path(_resolve_download_path(path, file_name, url))
        if wrapped:
            with zipfile.ZipFile(outfile, "w") as zf:
                zf.write(self.archives / file_name, file_name)
        else:
            shutil.copy(self.archives / file_name, outfile)

    def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False, licenses=[]):  # noqa: B006
        self.calls.append(("dataset_download_files", dataset))
        shutil.copy(self.archives / "planets-dataset.zip", Path(path) / f"{dataset.split('/')[-1]}.zip")

    def competition_submit(self, file_name, message, competition, quiet=False, sandbox=False):
        self.calls.append(("competition_submit", file_name, message, competition))


def test_the_fake_has_the_real_signatures():
    from kaggle.api.kaggle_api_extended import KaggleApi

    def params(f):
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    for name in ("competition_download_file", "dataset_download_files", "competition_submit"):
        assert params(getattr(FakeKaggleApi, name)) == params(getattr(KaggleApi, name)), name


@pytest.fixture
def fake_api(demo_root, tmp_path, monkeypatch):
    api = FakeKaggleApi(build_competition_archives(demo_root, tmp_path / "kaggle-side"))
    monkeypatch.setattr(kaggle, "kaggle_api", lambda: api)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    return api


def test_download_extracts_the_competition_layout_and_skips_when_done(fake_api, demo_root, tmp_path, caplog,
                                                                      capsys):
    caplog.set_level(logging.DEBUG)
    dest = tmp_path / "planet"
    assert main(["-v", "download", "--to", str(dest)]) == 0
    assert fake_api.calls == [("competition_download_file", COMPETITION, f) for f in COMPETITION_FILES]
    layout = find_layout(dest, need=("train", "test"))
    order, paths = ordered_test_images(layout)
    assert order == read_sample_submission(demo_root / "sample_submission_v2.csv") and len(paths) == 40
    assert (dest / "train-jpg" / "train_0.jpg").read_bytes() == (demo_root / "train-jpg" / "train_0.jpg").read_bytes()
    assert not list(dest.glob("*.7z")) and not list(dest.glob(".*.unpack*"))

    fake_api.calls.clear()
    assert main(["download", "--to", str(dest)]) == 0
    assert fake_api.calls == []  # everything was complete
    out = capsys.readouterr()
    assert SECRET not in caplog.text + out.out + out.err


def test_dataset_layout_download(fake_api, demo_root, tmp_path):
    with zipfile.ZipFile(fake_api.archives / "planets-dataset.zip", "w") as zf:
        zf.write(demo_root / "train_v2.csv", "planet/planet/train_classes.csv")
        for p in (demo_root / "train-jpg").iterdir():
            zf.write(p, f"planet/planet/train-jpg/{p.name}")
        zf.write(demo_root / "test-jpg" / "test_0.jpg", "planet/planet/test-jpg/test_0.jpg")
    kaggle.download(tmp_path / "ds", dataset="nikitarom/planets-dataset")
    assert fake_api.calls == [("dataset_download_files", "nikitarom/planets-dataset")]
    assert find_layout(tmp_path / "ds", need=("train", "test")).kind == "kaggle-dataset"


def test_missing_credentials_stop_before_any_download(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(kaggle, "kaggle_api", lambda: pytest.fail("the API must not be reached"))
    assert main(["download", "--to", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "KAGGLE_USERNAME and KAGGLE_KEY" in err and str(tmp_path / "nowhere" / "kaggle.json") in err


def test_world_readable_kaggle_json_warns_with_the_fix(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    cfg = tmp_path / "kaggle.json"
    cfg.write_text(json.dumps({"username": "someone", "key": SECRET}))
    cfg.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert kaggle.check_credentials() == str(cfg)
    assert f"chmod 600 {cfg}" in caplog.text and SECRET not in caplog.text
    caplog.clear()
    cfg.chmod(0o600)
    kaggle.check_credentials()
    assert "chmod" not in caplog.text


def test_submit_checks_first_then_submits(fake_api, demo_root, tmp_path, capsys):
    sample = demo_root / "sample_submission_v2.csv"
    bad = tmp_path / "bad.csv"
    bad.write_text("image_name,tags\ntest_0,clear\n")
    assert main(["submit", str(bad), "-m", "try", "--sample", str(sample)]) == 2
    assert fake_api.calls == []
    good = tmp_path / "good.csv"
    shutil.copy(sample, good)
    assert main(["submit", str(good), "-m", "rn34 stage 2", "--sample", str(sample)]) == 0
    assert fake_api.calls == [("competition_submit", str(good), "rn34 stage 2", COMPETITION)]
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err


def _zip_with(tmp_path, name):
    p = tmp_path / "evil.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr(name, b"x")
    return p


def _tar_with(tmp_path, add):
    p = tmp_path / "evil.tar"
    with tarfile.open(p, "w") as tf:
        add(tf)
    return p


def _file(tf, name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _link(tf, name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tf.addfile(info)


def _7z_with(tmp_path, name):
    p = tmp_path / "evil.tar.7z"
    src = tmp_path / "payload"
    src.write_bytes(b"x")
    with py7zr.SevenZipFile(p, "w") as z:
        z.write(src, name)
    return p


@pytest.mark.parametrize(
    "make",
    [
        lambda t: _zip_with(t, "../escaped.txt"),
        lambda t: _zip_with(t, "/tmp/escaped-abs.txt"),
        lambda t: _tar_with(t, lambda tf: _file(tf, "../escaped.txt")),
        lambda t: _tar_with(t, lambda tf: _file(tf, "/tmp/escaped-abs.txt")),
        lambda t: _tar_with(t, lambda tf: _link(tf, "train-jpg/link", "/etc/passwd")),
        lambda t: _tar_with(t, lambda tf: _link(tf, "train-jpg/link", "../../outside")),
        lambda t: _tar_with(t, lambda tf: _link(tf, "hard", "/etc/passwd", tarfile.LNKTYPE)),
        lambda t: _7z_with(t, "../escaped.txt"),
    ],
)
def test_malicious_archives_are_refused(tmp_path, make):
    archive = make(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArchiveError, match="refusing"):
        extract(archive, dest)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()
    assert not any(p.is_symlink() for p in dest.rglob("*"))


def _cve_2025_4517_chain(tf):
    """The shape of CVE-2025-4517's archive: a chain of symlinks, each resolving inside the target on its own
    (which the `data` filter of Python < 3.11.13 checks one at a time), that together climb out of it, then a file
    written through the chain."""
    depth = 4
    for i in range(depth):
        _link(tf, "/".join(["a"] * i + ["b"]), ".")  # a/b -> ., a/a/b -> ., ...: every link points inside
    _link(tf, "/".join(["a"] * depth + ["up"]), "/".join([".."] * depth))  # climbs exactly to the target
    _link(tf, "escape", "/".join(["a"] * depth + ["up", ".."]))  # ... and one step further
    _file(tf, "escape/escaped.txt")


@pytest.mark.parametrize("make", [
    lambda t: _tar_with(t, _cve_2025_4517_chain),
    lambda t: _tar_with(t, lambda tf: (_file(tf, "train-jpg/a.jpg"),
                                       _link(tf, "train-jpg/b.jpg", "train-jpg/a.jpg", tarfile.LNKTYPE))),
    lambda t: _tar_with(t, lambda tf: (_file(tf, "train-jpg/a.jpg"), _link(tf, "train-jpg/b.jpg", "a.jpg"))),
    lambda t: _zip_symlink(t),
    lambda t: _7z_symlink(t),
], ids=["tar-link-chain", "tar-hardlink-inside", "tar-symlink-inside", "zip-symlink", "7z-symlink"])
def test_every_link_member_is_refused_even_one_pointing_inside(tmp_path, make):
    """The data filter allows links that stay inside the target; planet-batch allows none (the competition's
    archives hold no links), so the filter's own link bugs cannot matter."""
    archive = make(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArchiveError, match=r"refusing link member '(b|train-jpg/b.jpg|link)'"):
        extract(archive, dest)
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert not (tmp_path / "escaped.txt").exists() and not (dest / "train-jpg" / "b.jpg").exists()


def _zip_symlink(tmp_path):
    p = tmp_path / "evil.zip"
    info = zipfile.ZipInfo("link")
    info.external_attr = (0o120777 << 16)  # S_IFLNK
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    return p


def _7z_symlink(tmp_path):
    p = tmp_path / "evil.tar.7z"
    (tmp_path / "link").symlink_to("/etc/passwd")
    with py7zr.SevenZipFile(p, "w") as z:
        z.write(tmp_path / "link", "link")
    return p


def test_kaggle_error_for_unknown_archive(tmp_path):
    with pytest.raises(ArchiveError, match="unknown archive"):
        extract(tmp_path / "x.rar", tmp_path)
    assert issubclass(KaggleError, RuntimeError)


def _bomb(tmp_path, kind):
    """64 MiB of zeros that compress to a few KB (a real bomb is the same, with more zeros)."""
    zeros, n = io.BytesIO(bytes(64 << 20)), 64 << 20
    if kind == "zip":
        p = tmp_path / "bomb.zip"
        with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("train-jpg/small.jpg", b"x" * 100)
            zf.writestr("train-jpg/zeros.jpg", zeros.getvalue())
        return p
    if kind == "tar.gz":
        p = tmp_path / "bomb.tar.gz"
        with tarfile.open(p, "w:gz") as tf:
            _file(tf, "train-jpg/small.jpg", b"x" * 100)
            info = tarfile.TarInfo("train-jpg/zeros.jpg")
            info.size = n
            tf.addfile(info, zeros)
        return p
    p = tmp_path / "bomb.tar.7z"
    inner = tmp_path / "bomb.tar"
    with tarfile.open(inner, "w") as tf:
        info = tarfile.TarInfo("train-jpg/zeros.jpg")
        info.size = n
        tf.addfile(info, zeros)
    with py7zr.SevenZipFile(p, "w") as z:
        z.write(inner, "bomb.tar")
    return p


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar.7z"])
def test_a_decompression_bomb_is_stopped_at_the_disk_budget(tmp_path, kind):
    archive = _bomb(tmp_path, kind)
    assert archive.stat().st_size < 1 << 20
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArchiveError, match="more than 1,000,000 bytes"):
        extract(archive, dest, limit=1_000_000)
    written = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert written <= 1_000_000, written
    # Within the budget the same archive extracts, and the default budget is the free disk less 1 GiB.
    extract(archive, dest, limit=200 << 20)
    assert (dest / "train-jpg" / "zeros.jpg").stat().st_size == 64 << 20
    assert disk_budget(dest) == max(0, shutil.disk_usage(dest).free - (1 << 30))


def test_a_link_in_a_downloaded_archive_is_one_line_and_what_was_there_stays(fake_api, tmp_path, capsys):
    """`planet-batch download` whose test-jpg.tar.7z holds a link chain: one line naming the member, exit 2; every
    file that was in the destination before is there byte for byte, and nothing is written outside it."""
    inner = _tar_with(tmp_path, _cve_2025_4517_chain)
    with py7zr.SevenZipFile(fake_api.archives / "test-jpg.tar.7z", "w") as z:
        z.write(inner, "test-jpg.tar")
    dest = tmp_path / "planet"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert main(["download", "--to", str(dest)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["planet-batch download: error: test-jpg.tar: refusing link member 'b' (-> '.')"], errors
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not (tmp_path / "escaped.txt").exists() and not any(p.is_symlink() for p in dest.rglob("*"))


def test_a_7z_declaring_more_than_the_budget_is_refused_before_anything_is_unpacked(tmp_path, monkeypatch):
    """The .7z layer's own budget: its inner tar would be on disk whole before the tar's budget could see it."""
    unpacked = []
    monkeypatch.setattr(py7zr.SevenZipFile, "extractall", lambda self, path=None, **kw: unpacked.append(path))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArchiveError, match="more than 1,000,000 bytes.*'bomb.tar'"):
        extract(_bomb(tmp_path, "tar.7z"), dest, limit=1_000_000)
    assert unpacked == []


def test_extraction_keeps_a_folder_of_the_old_unpack_name_and_an_archive_it_did_not_download(demo_root, tmp_path):
    """Kaggle's temporary folder is a new one (mkdtemp), so a user's folder of that name stays; an archive that was
    there before is extracted and kept, one the download wrote is removed once extracted."""
    archives = build_competition_archives(demo_root, tmp_path / "k")
    dest = tmp_path / "planet"
    (dest / ".train-jpg.tar.7z.unpack").mkdir(parents=True)
    (dest / ".train-jpg.tar.7z.unpack" / "mine.txt").write_text("mine")
    shutil.copy(archives / "train-jpg.tar.7z", dest)
    assert kaggle.fetch_and_extract(dest, "train-jpg.tar.7z", lambda: pytest.fail("downloaded again")) is True
    assert (dest / "train-jpg" / "train_0.jpg").exists()
    assert (dest / "train-jpg.tar.7z").read_bytes() == (archives / "train-jpg.tar.7z").read_bytes()
    assert (dest / ".train-jpg.tar.7z.unpack" / "mine.txt").read_text() == "mine"
    assert not [p for p in dest.iterdir() if p.name.startswith(".train-jpg.tar.7z.unpack-")]
    kaggle.fetch_and_extract(dest, "test-jpg.tar.7z", lambda: shutil.copy(archives / "test-jpg.tar.7z", dest))
    assert (dest / "test-jpg").is_dir() and not (dest / "test-jpg.tar.7z").exists()


def _damaged(archive: Path, how: str) -> Path:
    data = bytearray(archive.read_bytes())
    if how == "truncated":  # a download cut short
        del data[len(data) // 2:]
    else:  # one flipped byte in the compressed data
        data[len(data) // 3] ^= 0xFF
    archive.write_bytes(bytes(data))
    return archive


@pytest.mark.parametrize(("name", "how"), [("train_v2.csv.zip", "truncated"), ("train-jpg.tar.7z", "truncated"),
                                           ("train-jpg.tar.7z", "flipped")])
def test_a_damaged_archive_is_one_line_and_stays(demo_root, tmp_path, name, how):
    archive = _damaged(Path(shutil.copy(build_competition_archives(demo_root, tmp_path / "k") / name, tmp_path)), how)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArchiveError, match=f"{archive}: damaged archive .*; delete it and run the same command"):
        extract(archive, dest)
    assert archive.exists()


def test_a_download_cut_short_is_one_line_keeps_what_was_done_and_the_same_command_goes_on(fake_api, tmp_path,
                                                                                             capsys):
    whole = fake_api.archives / "test-jpg.tar.7z"
    kept = whole.read_bytes()
    _damaged(whole, "truncated")
    dest = tmp_path / "planet"
    assert main(["download", "--to", str(dest)]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error" in line] == [err.splitlines()[-1]], err
    assert f"error: {dest / 'test-jpg.tar.7z'}: damaged archive" in err and "Traceback" not in err, err
    assert (dest / "train-jpg" / "train_0.jpg").exists() and (dest / "train_v2.csv").exists()  # done before it
    whole.write_bytes(kept)  # the next download is whole
    (dest / "test-jpg.tar.7z").unlink()
    fake_api.calls.clear()
    assert main(["download", "--to", str(dest)]) == 0
    assert [c[2] for c in fake_api.calls] == ["test-jpg.tar.7z", "test-jpg-additional.tar.7z",
                                              "sample_submission_v2.csv.zip"]
    assert find_layout(dest, need=("train", "test")).kind


class KaggleStandIn(http.server.BaseHTTPRequestHandler):
    """The Kaggle API as kagglesdk calls it in its LOCAL environment (http://localhost/api/v1/SERVICE/METHOD): the
    download RPC answers with a redirect to a signed storage URL, large files wrapped in a zip, as Kaggle serves
    them."""

    archives: Path
    seen: list

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        name = body.get("fileName", "")
        if self.path != "/api/v1/competitions.CompetitionApiService/DownloadDataFile" or not name:
            self.send_response(404)
            self.end_headers()
            return
        wrapped = name in FakeKaggleApi.WRAPPED
        self.send_response(302)
        self.send_header("Location", f"/storage/{name}{'.zip' if wrapped else ''}?X-Goog-Signature=abc")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # noqa: N802
        name = self.path.split("?")[0].removeprefix("/storage/")
        source = self.archives / name.removesuffix(".zip") if name.endswith(".7z.zip") else self.archives / name
        data = source.read_bytes()
        if name.endswith(".7z.zip"):
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as zf:
                zf.writestr(source.name, data)
            data = buf.getvalue()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_the_real_client_authenticates_and_downloads_from_a_stand_in_for_the_api(demo_root, tmp_path, monkeypatch,
                                                                                 caplog, capsys):
    """The real KaggleApi (credentials from the environment, authenticate, kagglesdk's HTTP client, its naming
    of files after the URL) against a local server, through the kaggle CLI's own `--local` switch (its
    KaggleEnv.LOCAL endpoint, http://localhost)."""
    import base64

    from kaggle.api.kaggle_api_extended import KaggleApi

    handler = type("Handler", (KaggleStandIn,), {"archives": build_competition_archives(demo_root, tmp_path / "k"),
                                                  "seen": []})
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 80), handler)
    except OSError:
        pytest.skip("port 80 (kagglesdk's LOCAL endpoint) is taken or needs root")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(KaggleApi, "args", ["--local"])
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle-json"))
    caplog.set_level(logging.DEBUG)
    try:
        dest = kaggle.download(tmp_path / "planet")
    finally:
        server.shutdown()
    assert [body["fileName"] for _, _, body in handler.seen] == list(COMPETITION_FILES)
    basic = "Basic " + base64.b64encode(f"someone:{SECRET}".encode()).decode()
    assert all(auth == basic for _, auth, _ in handler.seen), handler.seen
    assert find_layout(dest, need=("train", "test")).kind == "competition"
    assert (dest / "test-jpg" / "test_0.jpg").read_bytes() == (demo_root / "test-jpg" / "test_0.jpg").read_bytes()
    out = capsys.readouterr()
    assert SECRET not in caplog.text + out.out + out.err
