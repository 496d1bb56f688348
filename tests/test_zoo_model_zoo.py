"""The ``musu://`` model zoo end to end: publish, serve from a local HTTP mirror, load, verify.

A randomly initialized model of the synthetic config (R-18, 64-channel FPN) is published with
:func:`musu.model_zoo.publish.publish` into a folder that a ``http.server`` on 127.0.0.1 (random
port, stopped by the fixture or by a timer) serves; ``MUSU_MODEL_ZOO_URL`` points at it and
``MUSU_CACHE_DIR`` at a fresh folder per test. The server counts requests per file and can serve
replacement bytes (tampered or truncated) under the published name.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from musu import model_zoo
from musu.data import register_coco_dataset
from musu.data.synthetic import ensure_split
from musu.model_zoo import ChecksumMismatchError, ModelZooEntry, ModelZooError
from musu.model_zoo.file_io import cache_dir, fetch, sha256_of

import train_net  # the root script (conftest.py puts the root and tools/ on sys.path)
from publish_model import PublishedModel, publish

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = "Synthetic/musu_paper_R_18_FPN_1200it.yaml"
NAME = "Synthetic/musu_paper_R_18_FPN_1200it"
SERVER_LIFETIME_S = 300.0


class Mirror:
    """A folder served over HTTP on 127.0.0.1; counts GETs per path, can serve other bytes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: Counter[str] = Counter()
        self.overrides: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = (
            {}
        )  # path -> bytes sent before closing (full length declared)
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(mirror.root), **kwargs)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = urllib.parse.unquote(self.path.lstrip("/"))
                mirror.requests[path] += 1
                if path in mirror.overrides or path in mirror.drop_after:
                    body = mirror.overrides.get(path) or (mirror.root / path).read_bytes()
                    sent = mirror.drop_after.get(path, len(body))
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:sent])
                    self.close_connection = True
                    return
                super().do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._timer = threading.Timer(SERVER_LIFETIME_S, self.server.shutdown)  # bounded
        self._timer.daemon = True

    def __enter__(self) -> "Mirror":
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def reset(self) -> None:
        self.requests.clear()
        self.overrides.clear()
        self.drop_after.clear()


def synthetic_model(seed: int) -> torch.nn.Module:
    cfg = model_zoo.get_config(CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def predict(model: torch.nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        instances = model([{"image": image}])[0]["instances"]
    return {
        "boxes": instances.pred_boxes.tensor,
        "scores": instances.scores,
        "classes": instances.pred_classes,
    }


def same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in own)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[PublishedModel, dict]:
    """A random synthetic-config model (biases set so that it detects things), saved as a
    training checkpoint and published; returns the publication and the reference weights."""
    model = synthetic_model(seed=7)
    with torch.no_grad():
        model.head.cls_score.bias.fill_(0.0)
        model.head.objectness.bias.fill_(3.0)
    run = tmp_path_factory.mktemp("run")
    torch.save({"model": model.state_dict(), "trainer": {"iteration": 3}, "iteration": 3},
               run / "model_final.pth")  # fmt: skip
    out = publish(run / "model_final.pth", tmp_path_factory.mktemp("mirror"), NAME, run)
    return out, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def server(published: tuple[PublishedModel, dict]) -> Iterator[Mirror]:
    root = published[0].path.parents[len(published[0].relpath.split("/")) - 1]
    with Mirror(root) as mirror:
        yield mirror


@pytest.fixture
def zoo(
    server: Mirror,
    published: tuple[PublishedModel, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Mirror, PublishedModel, dict]]:
    """Environment pointing at the mirror, a fresh cache, and the published model in the table
    under the synthetic config's name."""
    pub, state = published
    server.reset()
    monkeypatch.setenv("MUSU_MODEL_ZOO_URL", server.url)
    monkeypatch.setenv("MUSU_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(model_zoo.MODEL_ZOO_FILES, NAME, ModelZooEntry(pub.relpath, pub.sha256))
    yield server, pub, state


def test_checkpointer_loads_by_name_and_second_load_hits_cache(zoo) -> None:
    mirror, pub, state = zoo
    for attempt in range(2):
        model = synthetic_model(seed=100 + attempt)
        assert not same_weights(model, state)
        DetectionCheckpointer(model).load(f"musu://{NAME}")
        assert same_weights(model, state)
        assert mirror.requests[pub.relpath] == 1  # the second load is a cache hit
    cached = cache_dir() / pub.relpath
    assert cached.is_file() and sha256_of(cached) == pub.sha256
    assert model_zoo.get_checkpoint_url(CONFIG) == f"musu://{pub.relpath}"
    assert PathManager.get_local_path(f"musu://{pub.relpath}") == str(cached)
    assert mirror.requests[pub.relpath] == 1


def test_file_name_outside_table_verified_by_its_hash_prefix(zoo, monkeypatch) -> None:
    mirror, pub, state = zoo
    monkeypatch.delitem(model_zoo.MODEL_ZOO_FILES, NAME)
    model = synthetic_model(seed=3)
    DetectionCheckpointer(model).load(f"musu://{pub.relpath}")
    assert same_weights(model, state)
    mirror.overrides[pub.relpath] = b"not the published bytes"
    with pytest.raises(ChecksumMismatchError, match=pub.sha256[:12]):
        fetch(pub.relpath, force=True)


def test_get_trained_predicts_like_the_published_model(zoo) -> None:
    mirror, pub, state = zoo
    reference = synthetic_model(seed=0)
    reference.load_state_dict(state)
    image = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(1)) * 255
    expected = predict(reference, image)
    assert len(expected["scores"]) > 0  # a non-vacuous comparison

    assert model_zoo.get_config(CONFIG, trained=True).MODEL.WEIGHTS == f"musu://{pub.relpath}"
    model = model_zoo.get(CONFIG, trained=True, device="cpu")
    assert not model.training
    actual = predict(model, image)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    assert mirror.requests[pub.relpath] == 1


def test_tampered_file_refused_and_not_cached(zoo) -> None:
    mirror, pub, state = zoo
    body = bytearray(pub.path.read_bytes())
    body[len(body) // 2] ^= 0xFF  # one byte in the tensor data: still a loadable file
    mirror.overrides[pub.relpath] = bytes(body)
    actual = hashlib.sha256(body).hexdigest()
    model = synthetic_model(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ChecksumMismatchError) as error:
        DetectionCheckpointer(model).load(f"musu://{NAME}")
    message = str(error.value)
    assert pub.path.name in message and pub.sha256 in message and actual in message
    assert same_weights(model, before)
    assert not (cache_dir() / pub.relpath).exists()
    left = [p.name for p in (cache_dir() / pub.relpath).parent.iterdir()]
    assert not [name for name in left if not name.endswith(".lock")]  # no partial download


@pytest.mark.parametrize("mode", ["short_body", "connection_dropped"])
def test_truncated_file_refused(zoo, mode: str) -> None:
    mirror, pub, _ = zoo
    body = pub.path.read_bytes()
    if mode == "short_body":
        mirror.overrides[pub.relpath] = body[: len(body) // 2]
    else:
        mirror.drop_after[pub.relpath] = len(body) // 2
    with pytest.raises(ModelZooError, match=pub.path.name) as error:
        PathManager.get_local_path(f"musu://{NAME}")
    if mode == "connection_dropped":  # the declared length tells a transfer cut short
        assert f"received {len(body) // 2} of {len(body)} bytes" in str(error.value)
    assert not (cache_dir() / pub.relpath).exists()


def test_corrupt_cache_downloaded_once_more_then_refused(zoo) -> None:
    mirror, pub, state = zoo
    cached = Path(PathManager.get_local_path(f"musu://{NAME}"))
    assert mirror.requests[pub.relpath] == 1
    cached.write_bytes(cached.read_bytes()[:-100])  # truncated on disk
    assert PathManager.get_local_path(f"musu://{NAME}") == str(cached)
    assert mirror.requests[pub.relpath] == 2 and sha256_of(cached) == pub.sha256

    cached.write_bytes(b"corrupt")
    mirror.overrides[pub.relpath] = b"tampered"
    with pytest.raises(ChecksumMismatchError, match=pub.sha256):
        PathManager.get_local_path(f"musu://{NAME}")
    assert mirror.requests[pub.relpath] == 3  # exactly one re-download, then the error
    assert not cached.exists()


def test_unknown_and_unpublished_names(zoo) -> None:
    mirror, pub, _ = zoo
    for name in (
        "Nope/not_a_model",
        "Synthetic/model_final.pth",
        "../x/model_final_0123456789ab.pth",
    ):
        with pytest.raises(ModelZooError, match="Unknown MuSu model zoo name"):
            PathManager.get_local_path(f"musu://{name}")
    with pytest.raises(ModelZooError, match="No weights are published for config"):
        PathManager.get_local_path("musu://COCO-Detection/musu_R_50_FPN_1x")
    with pytest.raises(RuntimeError, match="No published MuSu weights"):
        model_zoo.get_checkpoint_url("COCO-Detection/musu_R_50_FPN_1x.yaml")
    with pytest.raises(ModelZooError, match="HTTP 404"):
        PathManager.get_local_path("musu://Synthetic/other/model_final_0123456789ab.pth")
    assert sum(mirror.requests.values()) == 1  # only the hashed name was requested


class _SideEffect:
    calls: list[str] = []

    def __reduce__(self) -> tuple:
        return (_SideEffect.calls.append, ("unpickled",))


@pytest.mark.parametrize("extra", ["object", "optimizer"])
def test_non_tensor_content_refused_even_with_matching_hash(zoo, tmp_path, extra) -> None:
    mirror, pub, state = zoo
    content: dict[str, Any] = {"model": {"w": torch.ones(2)}}
    content["x"] = _SideEffect() if extra == "object" else {"state": {0: torch.zeros(1)}}
    folder = mirror.root / "Evil"
    folder.mkdir(exist_ok=True)
    tmp = folder / "tmp.pth"
    torch.save(content, tmp)
    name = f"Evil/model_final_{sha256_of(tmp)[:12]}.pth"
    tmp.rename(mirror.root / name)
    with pytest.raises(ModelZooError, match="tensor-only|not a published MuSu checkpoint"):
        DetectionCheckpointer(torch.nn.Linear(2, 1)).load(f"musu://{name}")
    assert _SideEffect.calls == []


def test_local_folder_mirror_and_url_read_at_use_time(zoo, monkeypatch) -> None:
    mirror, pub, state = zoo
    monkeypatch.setenv("MUSU_MODEL_ZOO_URL", str(mirror.root))  # an air-gapped site's folder
    checkpoint = model_zoo.load_checkpoint(f"musu://{NAME}")
    assert checkpoint.keys() == {"model", "__author__"}
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in state.items())
    assert sum(mirror.requests.values()) == 0


def test_cache_dir_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("MUSU_CACHE_DIR", raising=False)
    monkeypatch.delenv("FVCORE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "musu" / "model_zoo"
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "fv"))
    assert cache_dir() == tmp_path / "fv" / "musu" / "model_zoo"
    monkeypatch.setenv("MUSU_CACHE_DIR", str(tmp_path / "musu"))
    assert cache_dir() == tmp_path / "musu" / "model_zoo"


def test_train_net_eval_only_with_musu_weights(zoo, tmp_path, monkeypatch) -> None:
    """``train_net.py --eval-only MODEL.WEIGHTS musu://<name>`` evaluates the published weights."""
    mirror, pub, state = zoo
    paths = ensure_split("val", tmp_path / "data", num_images=4, seed=5, image_size=128)
    if "zoo_eval_val" not in DatasetCatalog.list():
        register_coco_dataset("zoo_eval_val", paths.json_file, paths.image_root)
    evaluated = []
    original = train_net.Trainer.test

    def capture(cls, cfg, model, evaluators=None):
        evaluated.append(model)
        return original(cfg, model, evaluators)

    monkeypatch.setattr(train_net.Trainer, "test", classmethod(capture))
    argv = [
        "--config-file", model_zoo.get_config_file(CONFIG), "--eval-only",
        "MODEL.WEIGHTS", f"musu://{NAME}",
        "OUTPUT_DIR", str(tmp_path / "out"),
        "DATASETS.TEST", "('zoo_eval_val',)",
        "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TEST", "128",
        "INPUT.MAX_SIZE_TEST", "128",
    ]  # fmt: skip
    results = train_net.main(default_argument_parser().parse_args(argv))
    assert "AP" in results["bbox"]
    assert len(evaluated) == 1 and same_weights(evaluated[0], state)
    assert mirror.requests[pub.relpath] == 1


def test_train_net_cli_eval_only_downloads_from_mirror(zoo, tmp_path) -> None:
    """The real command line, in a fresh interpreter: ``import musu`` registers ``musu://``,
    the file is fetched from the mirror (by its hashed file name) and evaluated."""
    mirror, pub, _ = zoo
    paths = ensure_split("val", tmp_path / "data", num_images=2, seed=6, image_size=128)
    env = dict(os.environ, MUSU_MODEL_ZOO_URL=mirror.url, MUSU_CACHE_DIR=str(tmp_path / "cache"))
    env.update(OMP_NUM_THREADS="1")
    command = [
        sys.executable, str(REPO_ROOT / "train_net.py"),
        "--config-file", model_zoo.get_config_file(CONFIG), "--eval-only",
        "--register-coco", "zoo_cli_val", paths.json_file, paths.image_root,
        "MODEL.WEIGHTS", f"musu://{pub.relpath}",
        "OUTPUT_DIR", str(tmp_path / "out"),
        "DATASETS.TEST", "('zoo_cli_val',)",
        "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TEST", "128",
        "INPUT.MAX_SIZE_TEST", "128",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "out" / "log.txt").read_text()
    cached = tmp_path / "cache" / "model_zoo" / pub.relpath
    assert f"Loading from {cached}" in log
    assert "copypaste: AP,AP50,AP75" in log
    assert mirror.requests[pub.relpath] == 1
