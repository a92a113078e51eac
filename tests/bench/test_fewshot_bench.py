"""The Fashion-MNIST few-shot evidence (slow: it makes the default run, then 80 adapted annotations)."""

import numpy as np
import pytest


@pytest.mark.slow
def test_auto_reaches_the_target_and_never_falls_below_zero_shot(tmp_path_factory):
    from clipengine.bench.fewshot import ensure_run, evaluate, targets

    run = ensure_run(tmp_path_factory.mktemp("fashion") / "run")
    shots = (1, 4, 10, 16)
    results = evaluate(run, shots=shots, draws=5, baselines=False)
    checks = targets(results, shots)
    assert checks == {"auto ≥ 0.55 at 16 per class": True, "auto never below zero-shot": True}, results["accuracy"]
    accuracy = {key: float(np.mean(values)) for key, values in results["accuracy"].items()}
    for k in (10, 16):
        for method in ("prototype", "gda", "tip"):
            assert accuracy[(k, method)] > accuracy[(k, "zero-shot")] + 0.2, (k, method)
