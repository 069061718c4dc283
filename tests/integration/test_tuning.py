"""profile -> plan -> tune at small scale on this machine, against a real Triton serving the rendered configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tandem_serve.cli import main
from tandem_serve.client import TextEmbeddingClient
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.tuning.plan import Objective, make_plan
from tandem_serve.tuning.profile import Profile
from tandem_serve.tuning.render import ensemble_problems, read_config
from tandem_serve.tuning.tune import TuneOptions, Tuner, best_trial, format_trials, write_best
from tests.helpers import EDGE_TEXTS, assert_cosines


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A small text profile of this machine (the CLI), and its plan rendered into a repository (the CLI)."""
    work = tmp_path_factory.mktemp("tuning")
    assert main(["profile", "--out", str(work / "profile.json"), "--pipelines", "text", "--devices", "cpu",
                 "--batch-sizes", "1", "4", "--seq-lengths", "16", "--repeats", "1"]) == 0
    assert main(["plan", str(work / "profile.json"), "--out", str(work / "repo")]) == 0
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
                                  admin_key=server.admin_key))
        trials = tuner.run()
        assert len(trials) >= 2 and trials[0].kept and all(t.points[0].errors == 0 for t in trials)
        assert all(p.throughput > 0 for t in trials for p in t.points)
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
