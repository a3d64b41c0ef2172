"""The job on a CUDA device: the digits request end to end, with and without bf16 autocast.

Skipped cleanly where no GPU is visible (CI has none). On a GPU machine run it
without the cluster plugin, which needs the Kubernetes client:

    PYTHONPATH=job_image python -m pytest --noconftest -m gpu tests/job/test_gpu.py

What it guards: a model unlearned on the GPU is written so that a CPU-only
machine (a serving box, or the next request's job without a GPU) can load it,
and mixed precision does not change what the audit concludes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from unlearn import cli
from unlearn.model_io import load_model
from unlearning_contracts.spec import Location, parse_manifest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "requests" / "digits-gdpr.yaml"


@pytest.mark.parametrize("mixed_precision", [True, False])
def test_digits_request_on_cuda(tmp_path: Path, mixed_precision: bool) -> None:
    volumes = tmp_path / "volumes"
    assert cli.main(["prepare-demo", str(volumes / "models")]) == 0
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"].setdefault("method", {})["mixedPrecision"] = mixed_precision
    request = tmp_path / "request.yaml"
    request.write_text(yaml.safe_dump(manifest))
    result = tmp_path / "result.json"

    code = cli.main(
        ["run", str(request), "--volume-root", str(volumes), "--device", "cuda", "--result", str(result), "--json"]
    )

    record = json.loads(result.read_text())
    assert code == 0, record.get("reasons")
    assert record["verdict"] == "Passed"
    assert record["config"]["device"] == "cuda"  # record["device"] is the card's name
    # The held-out accuracy holds within the request's gate, measured on the GPU.
    assert record["pre"]["testAccuracy"] - record["post"]["testAccuracy"] <= 2.0
    assert record["post"]["forgetAccuracy"] <= record["pre"]["forgetAccuracy"]

    # The new version loads on the CPU: nothing in it is pinned to cuda:0.
    spec = parse_manifest(manifest).spec
    out = Location.from_uri(record["outputModel"]["uri"]).resolve(volumes)
    loaded = load_model(spec.model, out)
    logits = loaded.module(torch.zeros(4, 64))
    assert logits.device.type == "cpu"
    assert logits.shape == (4, 10)


@pytest.mark.parametrize("mixed_precision", [True, False])
def test_two_ranks_on_cuda_give_the_one_rank_result(tmp_path: Path, mixed_precision: bool) -> None:
    """``--nproc-per-node 2`` on the GPU: NCCL with two GPUs, gloo when both ranks share the one there is.

    Float32 keeps the CPU test's tolerance (tests/job/test_data_parallel.py); under bf16 autocast each
    rank's matmuls run on half the rows, which cuBLAS may sum in another order, so the check is on the
    audit's conclusions: the same verdict, accuracies within a point, the attack's AUC within 0.03.
    """
    volumes = tmp_path / "volumes"
    assert cli.main(["prepare-demo", str(volumes / "models")]) == 0
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"].setdefault("method", {})["mixedPrecision"] = mixed_precision
    request = tmp_path / "request.yaml"
    request.write_text(yaml.safe_dump(manifest))
    records = {}
    for ranks in (1, 2):
        result = tmp_path / f"result-{ranks}.json"
        args = ["--volume-root", str(volumes), "--device", "cuda", "--result", str(result)]
        code = cli.main(["run", str(request), *args, "--model-version", str(ranks), "--nproc-per-node", str(ranks)])
        records[ranks] = json.loads(result.read_text())
        assert code == 0, records[ranks].get("reasons")
    one, two = records[1], records[2]
    assert (one["worldSize"], two["worldSize"]) == (1, 2)
    assert two["config"]["device"] == "cuda:0"  # rank 0's device
    for phase in ("pre", "post"):
        for key in ("forgetAccuracy", "retainAccuracy", "testAccuracy"):
            assert two[phase][key] == pytest.approx(one[phase][key], abs=1.0 if mixed_precision else 0.5), key
        assert two[phase]["miaAuc"] == pytest.approx(one[phase]["miaAuc"], abs=0.03 if mixed_precision else 0.01)
