"""dtype="auto" (the default) and None follow the model's streamdiffusion.json "cpu_dtype" on a CPU, as the CLI does;
an explicit dtype still wins."""
import json
import os
import shutil


def test_auto_dtype_follows_the_models_cpu_dtype(sd, fixtures, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(os.path.join(fixtures, "models", "tiny-sd21"), model)
    assert sd.model_defaults(str(model))["cpu_dtype"] is None
    machine = sd.load_pipeline(str(model), threads=1).dtype  # no opinion in the folder: this CPU's rule
    named = "bf16" if machine == "fp32" else "fp32"  # what this machine would not pick itself
    (model / "streamdiffusion.json").write_text(json.dumps({"cpu_dtype": named}))
    assert sd.model_defaults(str(model))["cpu_dtype"] == named
    assert sd.load_pipeline(str(model), threads=1).dtype == named
    assert sd.load_pipeline(str(model), dtype=None, threads=1).dtype == named
    assert sd.load_pipeline(str(model), dtype=machine, threads=1).dtype == machine



def test_model_defaults_report_cpu_threads(sd, fixtures, tmp_path):
    """load_pipeline's threads=0 (the default) takes this count on a CPU (the CLI test checks the count in force)."""
    model = tmp_path / "model"
    shutil.copytree(os.path.join(fixtures, "models", "tiny-sd21"), model)
    assert sd.model_defaults(str(model))["cpu_threads"] is None
    (model / "streamdiffusion.json").write_text(json.dumps({"cpu_threads": 1}))
    assert sd.model_defaults(str(model))["cpu_threads"] == 1
    assert sd.model_defaults(None)["cpu_threads"] == 1  # the built-in model names it
    assert sd.load_pipeline(str(model), dtype="fp32").dtype == "fp32"
