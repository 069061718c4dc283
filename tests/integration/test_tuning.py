"""profile -> plan -> tune at small scale on this machine, against a real Triton serving the rendered configs."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tandem_serve.cli import main
from tandem_serve.clients.triton import TextEmbeddingClient
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.triton.model_config import ensemble_problems, read_config
from tandem_serve.tuning.profile import Profile
from tandem_serve.tuning.tune import TuneOptions, Tuner, best_trial, format_trials, write_best
from tests.helpers import EDGE_TEXTS, assert_cosines


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A small text profile of this machine (the CLI), and its plan rendered into a repository (the CLI)."""
    work = tmp_path_factory.mktemp("tuning")
    assert main(["profile", "--out", str(work / "profile.json"), "--pipelines", "text", "--devices", "cpu",
                 "--batch-sizes", "1", "4", "--seq-lengths", "16", "--repeats", "1"]) == 0
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["plan", str(work / "profile.json"), "--out", str(work / "repo")]) == 0
    (work / "plan.txt").write_text(printed.getvalue())
    return work


def test_profile_measures_every_text_stage_with_accuracy(planned):
    profile = Profile.load(planned / "profile.json")
    stages = {(t.stage, t.precision) for t in profile.stages}
    assert {("tokenize", "-"), ("token_embedding", "fp32"), ("encoder", "fp32"), ("encoder_fused", "fp32"),
            ("encoder", "int8")} <= stages
    for t in profile.stages:
        assert t.seconds > 0 and t.batch in (1, 4) and t.device == "cpu"
        if t.stage.startswith("encoder"):
            assert t.accuracy is not None and (t.accuracy > 0.9999 if t.precision == "fp32" else t.accuracy < 0.9999)
    assert (planned / "profile.png").stat().st_size > 10_000


def test_profile_measures_the_ensemble_step_costs_on_the_real_server(planned):
    serving = Profile.load(planned / "profile.json").serving
    assert serving is not None
    trips = serving.latencies_s
    small, large = "16", str(serving.payload_bytes)
    assert trips[f"3x{small}"] > trips[f"1x{small}"] and trips[f"3x{large}"] > trips[f"1x{large}"]
    assert serving.step_s == pytest.approx((trips[f"3x{small}"] - trips[f"1x{small}"]) / 2)
    assert 0 < serving.step_s < 0.05
    assert 0.05e9 < 1 / serving.byte_s < 200e9  # bytes/s between two steps: shared memory, not a network
    assert "Triton step cost" in (planned / "plan.txt").read_text()
    # the real tokenizer served alone: one instance, always a request waiting, so its requests are at least its
    # compute time apart (the hand-off between executions on top), and the plan sizes its instances by that
    tokenize = serving.adapters["tokenize"]
    assert 0 < tokenize.busy_s <= tokenize.period_s * 1.02 and tokenize.period_s < 0.05
    assert "ms apart, hand-off included" in (planned / "plan.txt").read_text()


def test_the_rendered_plan_is_served_by_triton_and_tuned(planned, reference, tmp_path):
    repo = planned / "repo" / "triton"
    plan = json.loads((planned / "repo" / "plan.json").read_text())["plans"]["text"]
    ensemble = plan["ensemble"]
    assert ensemble_problems(repo, ensemble) == []
    options = TritonOptions(model_repositories=[repo], model_control=True, workspace=tmp_path / "triton")
    with EmbeddedTriton(options) as server:
        with TextEmbeddingClient(server.grpc_url, "grpc", ensemble) as client:
            assert_cosines(client.embed(EDGE_TEXTS), reference(EDGE_TEXTS))
        admin = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException, match="(?i)unauthori|denied|permission|restricted"):
            admin.load_model("tokenizer")  # model control stays behind the admin key
        tuner = Tuner(TuneOptions(server.grpc_url, ensemble, concurrencies=(1, 2), seconds=1.5, rounds=1,
                                  admin_key=server.admin_key, protocol="http", http_url=server.http_url, shm="system",
                                  shm_key=server.keys.shm))
        trials = tuner.run()  # the load over HTTP with system shared memory; configs over gRPC
        assert len(trials) >= 2 and trials[0].kept and all(t.points[0].errors == 0 for t in trials)
        assert all(p.throughput > 0 for t in trials for p in t.points)
        composing = {s.model for s in trials[0].stages}
        assert all({s.model for s in p.stages} >= composing | {ensemble} for t in trials for p in t.points)
        status = admin.get_system_shared_memory_status(headers=server.keys.shm_headers("grpc"))
        assert not [r for r in status.regions if r.startswith("tandem")]
        table = format_trials(trials)
        assert "as loaded" in table and "best:" in table
        best = best_trial(trials)
        written = write_best(trials, repo)
        assert written and all(read_config(path).name for path in written)
        live = {m: json.loads(raw) for m, raw in best.configs.items()}
        for path in written:
            on_disk = read_config(path)
            assert on_disk.max_batch_size == int(live[on_disk.name].get("max_batch_size", 0))
        with TextEmbeddingClient(server.grpc_url, "grpc", ensemble) as client:
            assert_cosines(client.embed(EDGE_TEXTS[:3]), reference(EDGE_TEXTS[:3]))


def test_a_plan_for_utf8_clients_is_served_and_tuned_with_their_requests(planned, reference, tmp_path):
    """`tandem plan --text-input utf8` renders text_embedding_utf8 alone; Triton serves it and `tandem tune`'s load is
    one text's UTF-8 bytes per request."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["plan", str(planned / "profile.json"), "--text-input", "utf8", "--out", str(tmp_path / "repo")]) == 0
    repo = tmp_path / "repo" / "triton"
    assert json.loads((tmp_path / "repo" / "plan.json").read_text())["plans"]["text"]["ensemble"] == "text_embedding_utf8"
    assert sorted(p.name for p in repo.iterdir()) == ["encoder_utf8", "text_embedding_utf8"]
    options = TritonOptions(model_repositories=[repo], model_control=True, workspace=tmp_path / "triton")
    with EmbeddedTriton(options) as server:
        with TextEmbeddingClient(server.grpc_url, "grpc", "text_embedding_utf8") as client:
            assert client.utf8 and client.max_batch_size == 1
            assert_cosines(client.embed(EDGE_TEXTS), reference(EDGE_TEXTS))
        tuner = Tuner(TuneOptions(server.grpc_url, "text_embedding_utf8", concurrencies=(4,), seconds=1.5, rounds=1,
                                  admin_key=server.admin_key))
        trials = tuner.run()
        assert trials[0].kept and all(p.errors == 0 and p.throughput > 0 for t in trials for p in t.points)
        assert {s.model for s in trials[0].stages} == {"encoder_utf8"}  # the one composing model, tuned
