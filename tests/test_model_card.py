"""Model cards (`stages/card.py`) read back with `huggingface_hub.ModelCard`, and
`--push-to-hub` (`artifact/hub.py`) against a local stand-in of the Hub's HTTP API.

The stand-in serves the four endpoints `create_repo` and `upload_folder` call (create,
validate-yaml, preupload, commit) and answers "regular" for every file, so no LFS or Xet
transfer is involved; it keeps what it was sent, so a test compares the uploaded files with
the output folder. It is not the Hub: its answers follow the client's parsing, not the Hub's
checks (permissions, quotas, LFS for large files).
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard, constants
from pydantic import ValidationError

import mposurgeon
from mposurgeon.artifact.hub import PushError, commit_message, push_folder
from mposurgeon.artifact.manifest import load_artifact, read_manifest
from mposurgeon.errors import UsageError
from mposurgeon.stages.card import (
    BASE_CARD_HEADING,
    base_hub_id,
    license_from_files,
    model_card,
)
from tests.cli_runner import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
APACHE = (
    "\n    Apache License\n    Version 2.0, January 2004\n    http://www.apache.org/licenses/\n"
)
MIT = (
    "MIT License\n\nCopyright (c) 2024 Someone\n\nPermission is hereby granted, free of charge, ..."
)


def _card(directory: Path) -> ModelCard:
    return ModelCard.load(directory / "README.md")


# -- a local stand-in of the Hub API ---------------------------------------------------------


@dataclass
class StandIn:
    """What the stand-in Hub was sent, by repository."""

    url: str
    created: list[dict[str, Any]] = field(default_factory=list)
    validated: list[str] = field(default_factory=list)
    commits: list[dict[str, Any]] = field(default_factory=list)


def _handler(hub: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts == ["api", "repos", "create"]:
                payload = json.loads(raw)
                hub.created.append(payload | {"auth": self.headers.get("authorization")})
                name = f"{payload['organization']}/{payload['name']}"
                return self._reply(200, {"url": f"{hub.url}/{name}"})
            if parts == ["api", "validate-yaml"]:
                hub.validated.append(json.loads(raw)["content"])
                return self._reply(200, {"errors": [], "warnings": []})
            if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                files = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in json.loads(raw)["files"]
                ]
                return self._reply(200, {"files": files})
            if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                lines = [json.loads(line) for line in raw.decode().splitlines() if line]
                header = next(x["value"] for x in lines if x["key"] == "header")
                files = {
                    x["value"]["path"]: base64.b64decode(x["value"]["content"])
                    for x in lines
                    if x["key"] == "file"
                }
                repo = f"{parts[2]}/{parts[3]}"
                oid = f"{len(hub.commits) + 1:040x}"
                url = f"{hub.url}/{repo}/commit/{oid}"
                hub.commits.append(
                    {"repo": repo, "summary": header["summary"], "files": files, "url": url}
                )
                return self._reply(
                    200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None}
                )
            return self._reply(404, {"error": f"no such endpoint: {self.path}"})

    return Handler


@pytest.fixture(scope="module")
def stand_in() -> Iterator[StandIn]:
    """The stand-in Hub, with huggingface_hub pointed at it (endpoint, a token, online)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    hub = StandIn(url=f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = _handler(hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with pytest.MonkeyPatch.context() as mp:
        _online(mp, hub.url)
        yield hub
    server.shutdown()
    server.server_close()


def _online(mp: pytest.MonkeyPatch, endpoint: str) -> None:
    """huggingface_hub online, with a token, talking to `endpoint`."""
    mp.setattr(constants, "ENDPOINT", endpoint)
    mp.setenv("HF_ENDPOINT", endpoint)
    mp.setenv("HF_TOKEN", "hf_standin_token")
    mp.delenv("HF_HUB_OFFLINE", raising=False)
    mp.delenv("TRANSFORMERS_OFFLINE", raising=False)
    mp.setattr(constants, "HF_HUB_OFFLINE", False)


def _closed_port_url() -> str:
    """An endpoint where nothing listens: every request fails to connect."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# -- outputs of the shipped MiniLM -----------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM by its hub id (the bundled copy), its pooler decomposed: a fast real artifact."""
    out = tmp_path_factory.mktemp("card-minilm") / "dec"
    mposurgeon.decompose("minilm", output=out, layers=["pooler"])
    return out


def test_an_artifact_of_a_hub_model_names_it_and_keeps_its_license_and_card(
    minilm_hub: Path, minilm_dir: Path
) -> None:
    card = _card(minilm_hub)
    meta = card.data.to_dict()
    assert meta["base_model"] == MINILM_ID
    assert meta["license"] == "apache-2.0"  # from MiniLM's own card
    assert meta["language"] == "en"
    assert meta["library_name"] == "mposurgeon"  # transformers alone would load it wrong
    assert meta["tags"] == ["mposurgeon", "mpo", "mposurgeon-decompose"]
    assert meta["pipeline_tag"] == "sentence-similarity"  # no head: the base's
    base = ModelCard.load(minilm_dir / "README.md")
    assert base.text.strip() in card.text  # the base's card, whole
    assert card.text.index(BASE_CARD_HEADING) > card.text.index("## How to load it")
    assert "datasets" not in meta  # the base's YAML is folded in, not copied
    assert "- s2orc" not in card.content and card.content.count("license: ") == 1
    assert "mposurgeon.load_model(" in card.text
    assert "| 1 | `decompose` | layers=pooler |" in card.text
    assert "| mpo | 1 |" in card.text  # the pooler's parameters as cores


def test_a_merged_sentence_transformer_is_one_and_keeps_the_base_card_once(
    minilm_hub: Path, minilm_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dense"
    mposurgeon.merge(minilm_hub, output=out)
    card = _card(out)
    meta = card.data.to_dict()
    assert meta["library_name"] == "sentence-transformers"  # modules.json came along
    assert meta["base_model"] == MINILM_ID and meta["license"] == "apache-2.0"
    assert meta["tags"] == ["mposurgeon", "mpo", "mposurgeon-merge", "sentence-transformers"]
    base = ModelCard.load(minilm_dir / "README.md").text.strip()
    assert card.text.count(base) == 1 and card.text.count(BASE_CARD_HEADING) == 1
    assert "BertModel.from_pretrained(" in card.text and "SentenceTransformer(" in card.text
    assert "mposurgeon.load_model(" not in card.text
    assert "| 2 | `merge` | - |" in card.text


def test_a_local_base_is_never_a_base_model_but_its_license_is_kept(
    minilm_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dec"
    mposurgeon.decompose(minilm_dir, output=out, layers=["pooler"])
    meta = _card(out).data.to_dict()
    assert "base_model" not in meta
    assert meta["license"] == "apache-2.0"
    assert str(minilm_dir) in _card(out).text  # the body says where it came from


def test_a_hub_cache_snapshot_path_names_its_hub_id() -> None:
    from mposurgeon.artifact.manifest import BaseInfo

    snap = "/home/u/.cache/huggingface/hub/models--org--some-model/snapshots/abc123"
    assert base_hub_id(BaseInfo(name="x", model_id=None, revision=None, path=snap)) == (
        "org/some-model"
    )
    local = BaseInfo(name="x", model_id=None, revision=None, path="/data/models/x")
    assert base_hub_id(local) is None


# -- license files and tiny models -----------------------------------------------------------


def test_a_license_file_names_the_license_when_its_text_is_plain(tmp_path: Path) -> None:
    def with_files(name: str, files: dict[str, str]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text)
        return folder

    assert license_from_files([with_files("apache", {"LICENSE": APACHE})]) == "apache-2.0"
    assert license_from_files([with_files("mit", {"LICENSE.txt": MIT})]) == "mit"
    assert (
        license_from_files(
            [with_files("gpl", {"COPYING": "GNU GENERAL PUBLIC LICENSE\nVersion 3, 29 June 2007"})]
        )
        == "gpl-3.0"
    )
    assert license_from_files([with_files("odd", {"LICENSE": "Do what you like."})]) is None
    both = with_files("both", {"LICENSE": APACHE, "LICENSE-MIT": MIT})
    assert license_from_files([both]) is None  # two licenses: not obvious
    none = with_files("none", {"NOTES.md": APACHE})
    assert license_from_files([none, with_files("later", {"LICENSE": MIT})]) == "mit"


def test_a_license_file_and_a_plain_card_of_a_tiny_base_carry_through_a_chain(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir("bert"), base)
    (base / "LICENSE").write_text(APACHE)
    (base / "README.md").write_text("# A tiny BERT\n\nNo metadata here, just text.\n")
    dec = tmp_path / "dec"
    mposurgeon.decompose(base, output=dec, layers=["FFN_1"])
    card = _card(dec)
    assert card.data.to_dict()["license"] == "apache-2.0"
    assert "pipeline_tag" not in card.data.to_dict()  # no head, and no base card metadata
    assert "# A tiny BERT\n\nNo metadata here, just text." in card.text
    dense = tmp_path / "dense"
    mposurgeon.merge(dec, output=dense, verify=True)
    card = _card(dense)
    assert "Verified: on a sample input its outputs match" in card.text
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert card.text.count("No metadata here, just text.") == 1


# -- train: metrics, and the push -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(
    tiny_mpo: Path,
    stand_in: StandIn,
    tmp_path_factory: pytest.TempPathFactory,
    one_torch_thread: None,
) -> tuple[Path, Any]:
    """The tiny MPO classifier trained 2 steps (lightweight) with an eval, pushed to the
    stand-in Hub as me/tiny-trained."""
    out = tmp_path_factory.mktemp("card-train") / "trained"
    result = mposurgeon.train(
        tiny_mpo,
        output=out,
        data=TRAIN,
        eval_data=EVAL,
        method="lightweight",
        max_steps=2,
        batch_size=32,
        push_to_hub="me/tiny-trained",
    )
    return out, result


def test_a_trained_artifact_shows_its_method_metrics_and_head(
    trained: tuple[Path, Any],
) -> None:
    out, _ = trained
    card = _card(out)
    meta = card.data.to_dict()
    metrics = read_manifest(out).metrics
    assert metrics is not None
    assert meta["library_name"] == "mposurgeon"
    assert meta["tags"] == ["mposurgeon", "mpo", "lightweight", "mposurgeon-train"]
    assert meta["pipeline_tag"] == "text-classification"  # the classifier head train added
    assert "model-index" not in meta  # a local eval file has no data set id: a table instead
    assert f"| accuracy | {metrics['eval_accuracy']:.4g} |" in card.text
    assert f"| loss | {metrics['eval_loss']:.4g} |" in card.text
    assert "sentiment-eval.jsonl" in card.text and "method `lightweight`" in card.text
    assert "method=lightweight" in card.text and "max_steps=2" in card.text
    assert "epochs=3" not in card.text  # the default is not repeated
    # pushed: the card says how to load it from the repository
    assert 'mposurgeon.load_model(snapshot_download("me/tiny-trained"))' in card.text


def test_train_pushes_the_written_artifact_and_returns_the_commit(
    trained: tuple[Path, Any], stand_in: StandIn
) -> None:
    out, result = trained
    commit = next(c for c in stand_in.commits if c["repo"] == "me/tiny-trained")
    assert result.commit_url == commit["url"]
    assert commit["files"] == _files(out)  # every file, as written (the manifest included)
    assert commit["summary"] == commit_message("train")
    created = next(c for c in stand_in.created if c["name"] == "tiny-trained")
    assert created["organization"] == "me" and created["visibility"] == "public"
    assert created["auth"] == "Bearer hf_standin_token"  # the token huggingface_hub found
    assert any("library_name: mposurgeon" in text for text in stand_in.validated)
    assert "push_to_hub" not in read_manifest(out).lineage[-1].options  # delivery, not recipe
    load_artifact(out)  # still whole


def test_a_merged_trained_artifact_keeps_the_training_figures(
    trained: tuple[Path, Any], stand_in: StandIn, tmp_path: Path
) -> None:
    out, _ = trained
    dense = tmp_path / "dense"
    result = mposurgeon.merge(out, output=dense, push_to_hub="me/tiny-dense", private=True)
    card = _card(dense)
    meta = card.data.to_dict()
    metrics = read_manifest(out).metrics
    assert metrics is not None
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["mposurgeon", "mpo", "lightweight", "mposurgeon-merge", "transformers"]
    assert f"| accuracy | {metrics['eval_accuracy']:.4g} |" in card.text
    assert "figures of the train output" in card.text
    assert 'BertForSequenceClassification.from_pretrained("me/tiny-dense")' in card.text
    created = next(c for c in stand_in.created if c["name"] == "tiny-dense")
    assert created["visibility"] == "private"
    commit = next(c for c in stand_in.commits if c["repo"] == "me/tiny-dense")
    assert commit["files"] == _files(dense) and commit["summary"] == commit_message("merge")
    assert result.commit_url == commit["url"]


def test_the_cli_prints_the_commit_and_puts_it_in_json(
    tiny_mpo: Path, stand_in: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "merge", tiny_mpo, "-o", tmp_path / "a", "--push-to-hub", "me/a")
    assert result.code == 0, result
    url = next(c["url"] for c in stand_in.commits if c["repo"] == "me/a")
    assert f"pushed to me/a: {url}" in result.out
    result = run_cli(
        capsys, "merge", tiny_mpo, "-o", tmp_path / "b", "--push-to-hub", "me/b", "--json"
    )
    assert result.code == 0, result
    url = next(c["url"] for c in stand_in.commits if c["repo"] == "me/b")
    assert json.loads(result.out)["commit_url"] == url


def test_eval_metrics_on_a_hub_data_set_become_the_model_index(
    trained: tuple[Path, Any], tmp_path: Path
) -> None:
    out, _ = trained
    manifest = read_manifest(out)
    assert manifest.metrics is not None
    manifest.metrics["data"]["eval"] = {"id": "org/sentiment", "split": "validation"}
    manifest.metrics["data"]["train"] = {"id": "org/sentiment", "split": "train"}
    card = model_card(out, manifest, source=out)
    card.save(tmp_path / "README.md")
    meta = ModelCard.load(tmp_path / "README.md").data
    assert meta.datasets == ["org/sentiment"]
    results = {r.metric_type: r for r in meta.eval_results or []}
    assert results["accuracy"].metric_value == pytest.approx(manifest.metrics["eval_accuracy"])
    assert results["f1"].metric_value == pytest.approx(manifest.metrics["eval_macro_f1"])
    first = results["accuracy"]
    assert (first.task_type, first.dataset_type, first.dataset_split) == (
        "text-classification",
        "org/sentiment",
        "validation",
    )


# -- a push that cannot happen, or fails -------------------------------------------------------


def test_a_bad_repo_id_fails_before_any_work(
    tiny_mpo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match="not a Hub repository id"):
        mposurgeon.merge(tiny_mpo, output=out, push_to_hub="me/bad/id")
    result = run_cli(capsys, "merge", tiny_mpo, "-o", out, "--push-to-hub", "me/bad..id")
    assert_one_line_error(result, 2, "--push-to-hub", "me/bad..id")
    result = run_cli(
        capsys, "train", tiny_mpo, "-o", out, "--data", TRAIN, "--method", "lightweight",
        "--push-to-hub", "-not-a-repo",
    )  # fmt: skip
    assert_one_line_error(result, 2, "--push-to-hub", "-not-a-repo")
    with pytest.raises(ValidationError, match="--private applies"):
        mposurgeon.merge(tiny_mpo, output=out, private=True)
    assert not out.exists()


def test_offline_or_no_token_fails_before_any_work(
    tiny_mpo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="offline"):
        mposurgeon.merge(tiny_mpo, output=out, push_to_hub="me/x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(UsageError, match="no Hugging Face token") as err:
        mposurgeon.merge(tiny_mpo, output=out, push_to_hub="me/x")
    assert "hf auth login" in str(err.value.hint)
    with pytest.raises(UsageError, match="dry run"):
        mposurgeon.train(
            tiny_mpo, data=TRAIN, method="lightweight", dry_run=True, push_to_hub="me/x"
        )
    assert not out.exists()


def test_a_failed_push_keeps_the_output_and_says_how_to_push_it(
    tiny_mpo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _online(monkeypatch, _closed_port_url())  # the network fails
    out = tmp_path / "dense"
    with pytest.raises(PushError) as err:
        mposurgeon.merge(tiny_mpo, output=out, push_to_hub="me/x")
    assert err.value.exit_code == 1 and err.value.output == out.resolve()
    assert f"kept at {out.resolve()}" in str(err.value)
    assert err.value.hint == f"push it by hand: hf upload me/x {out.resolve()}"
    load_artifact(out)  # the merged checkpoint is whole: manifest and checksums
    assert _card(out).data.to_dict()["library_name"] == "transformers"

    cli_out = tmp_path / "cli dense"  # a path that needs quoting in the hint
    result = run_cli(capsys, "merge", tiny_mpo, "-o", cli_out, "--push-to-hub", "me/x")
    assert_one_line_error(
        result, 1, "the push to me/x failed", f"hf upload me/x '{cli_out.resolve()}'"
    )
    load_artifact(cli_out)


def test_offline_at_push_time_fails_in_one_line_and_touches_nothing(
    tiny_mpo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_HUB_OFFLINE as the client reads it: its OfflineModeIsEnabled becomes a PushError."""
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = _files(tiny_mpo)
    with pytest.raises(PushError, match="OfflineModeIsEnabled") as err:
        push_folder(tiny_mpo, "me/x", private=False, stage="decompose")
    assert "\n" not in str(err.value) and f"kept at {tiny_mpo.resolve()}" in str(err.value)
    assert _files(tiny_mpo) == before
