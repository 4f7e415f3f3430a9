"""`python -m experiments.convert_official` on the tiny official fixture: convert, load,
initialise pretraining, export back to torch."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from ct_rate_jax import checkpoint_io, sharding  # noqa: E402
from ct_rate_jax.models.ct_clip import CTCLIPConfig, variant  # noqa: E402
from ct_rate_jax.training import checkpoints, train_state  # noqa: E402
from experiments import convert_official, gin_setup, pretrain  # noqa: E402

pytestmark = pytest.mark.torch
REPO = pathlib.Path(__file__).resolve().parents[2]


def relative_error(ours, reference):
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def flat_weights(model):
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
            jax.tree_util.tree_flatten_with_path(checkpoint_io.weights_of(model))[0]}


@nnx.jit
def _forward(model, volume, ids, mask):
    image, text = model(volume, ids, mask)
    return image, text, model.logit_scale()


def forward(model, io):
    """(image latents, text latents, logit scale) of the fixture's inputs, as numpy."""
    outputs = _forward(model, jnp.asarray(io["volume_bcdhw"][:, 0]),
                       jnp.asarray(io["input_ids"]), jnp.asarray(io["attention_mask"]))
    return tuple(np.asarray(x) for x in outputs)


@pytest.fixture(scope="module")
def io(official_ctclip_dir):
    return dict(np.load(official_ctclip_dir / "io_A.npz"))


@pytest.fixture(scope="module")
def options(official_ctclip_dir, tmp_path_factory):
    """The fixture's architecture as command-line options (the defaults are v2)."""
    config = json.loads((official_ctclip_dir / "config_A.json").read_text())
    bert_config = tmp_path_factory.mktemp("options") / "config.json"
    bert_config.write_text(json.dumps(config["bert_config"]))
    return ["--ctvit-kwargs", json.dumps(config["ctvit"]), "--bert-config", str(bert_config),
            "--dim-latent", str(config["dim_latent"])]


def convert(checkpoint, out, options, *extra):
    assert convert_official.main(["--checkpoint", str(checkpoint), *options, *extra,
                                  "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def converted(official_ctclip_dir, options, tmp_path_factory):
    return convert(official_ctclip_dir / "ctclip_A.pt",
                   tmp_path_factory.mktemp("converted") / "ctclip_A", options)


@pytest.fixture(scope="module")
def converted_lipro(official_ctclip_dir, options, tmp_path_factory):
    return convert(official_ctclip_dir / "lipro_A.pt",
                   tmp_path_factory.mktemp("converted") / "lipro_A", options)


def test_converted_directory_reproduces_the_official_model(converted, official_ctclip_dir, io):
    model, extras = checkpoint_io.load_converted(converted)
    assert extras == {}
    image, text, scale = forward(model, io)
    assert relative_error(image, io["image_latents"]) < 1e-4
    assert relative_error(text, io["text_latents"]) < 1e-4
    assert relative_error((image * text).sum(-1) * scale, io["similarity"]) < 1e-4

    source = official_ctclip_dir / "ctclip_A.pt"
    record = json.loads((converted / "conversion.json").read_text())
    assert record["variant"] == "clip" and record["source"] == str(source.resolve())
    assert record["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert record["parameter_count"] == checkpoint_io.parameter_count(model)
    assert "to_visual_latent_extra.weight" in record["ignored_keys"]
    assert checkpoint_io.read_config(converted) == model.config

    # model.gin binds the same config.
    gin_setup.parse_gin([str(converted / "model.gin")])
    try:
        assert gin.get_configurable(CTCLIPConfig)() == model.config
    finally:
        gin.clear_config()


def test_lipro_directory_keeps_the_classifier_head(converted_lipro, io):
    model, extras = checkpoint_io.load_converted(converted_lipro)
    assert sorted(extras) == ["classifier.bias", "classifier.weight"]
    image, _, _ = forward(model, io)
    logits = np.maximum(image, 0) @ extras["classifier.weight"].T + extras["classifier.bias"]
    assert relative_error(logits, io["lipro_logits"]) < 1e-4
    assert json.loads((converted_lipro / "conversion.json").read_text())["variant"] == "lipro"


@pytest.mark.parametrize("name, reference", [("ctclip_A", "ctclip_A.pt"),
                                             ("lipro_A", "lipro_A.pt")])
def test_torch_export_loads_strictly_and_round_trips_bitwise(
        name, reference, converted, converted_lipro, official_ctclip_dir, options, tmp_path):
    directory = {"ctclip_A": converted, "lipro_A": converted_lipro}[name]
    exported = tmp_path / f"{name}.pt"
    assert convert_official.main(["--to-torch", "--from", str(directory),
                                  "--out", str(exported)]) == 0
    ours = torch.load(exported, weights_only=True)
    official = torch.load(official_ctclip_dir / reference, weights_only=True)
    # The official module's own key set and shapes: its strict load_state_dict accepts it.
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in official.items()}
    unused = set(json.loads((directory / "conversion.json").read_text())["ignored_keys"])
    for key, value in official.items():
        if key not in unused:
            assert torch.equal(ours[key], value), key

    back, original = checkpoint_io.load_converted(convert(exported, tmp_path / "back", options))
    model, extras = checkpoint_io.load_converted(directory)
    for (key, a), b in zip(flat_weights(model).items(), flat_weights(back).values()):
        np.testing.assert_array_equal(a, b, err_msg=key)
    assert extras.keys() == original.keys()
    for key in extras:
        np.testing.assert_array_equal(extras[key], original[key])


def test_minimal_export_leaves_out_unused_entries(converted, tmp_path):
    exported = tmp_path / "minimal.pt"
    assert convert_official.main(["--to-torch", "--from", str(converted), "--minimal",
                                  "--position-ids", "--out", str(exported)]) == 0
    ours = torch.load(exported, weights_only=True)
    assert "to_visual_latent_extra.weight" not in ours
    assert ours["text_transformer.embeddings.position_ids"].tolist() == [list(range(64))]


def test_bad_checkpoints_give_one_clear_error(official_ctclip_dir, options, tmp_path, capsys):
    state = torch.load(official_ctclip_dir / "ctclip_A.pt", weights_only=True)
    del state["visual_transformer.to_patch_emb.2.weight"]
    state["text_transformer.encoder.layer.0.output.dense.bias"] = torch.zeros(3)
    state["surprise.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "bad.pt")
    status = convert_official.main(["--checkpoint", str(tmp_path / "bad.pt"), *options,
                                    "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert status == 1 and error.startswith("error: ") and "Traceback" not in error
    for key in ("missing", "visual_transformer.to_patch_emb.2.weight", "unexpected",
                "surprise.weight", "mis-shaped",
                "text_transformer.encoder.layer.0.output.dense.bias: checkpoint (3,)"):
        assert key in error
    assert not (tmp_path / "out" / "weights").exists()

    status = convert_official.main(["--checkpoint", str(official_ctclip_dir / "ctclip_A.pt"),
                                    "--variant", "lipro", *options, "--out", str(tmp_path / "o")])
    assert status == 1 and "not variant 'lipro'" in capsys.readouterr().err

    # As a user runs it: exit status 1, one line, no traceback.
    run = subprocess.run([sys.executable, "-m", "experiments.convert_official", "--checkpoint",
                          str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp_path / 'missing.pt'} does not exist"]


def test_pretrain_init_checkpoint_and_export_of_a_workdir(converted, tmp_path):
    # A train state on a 2-device mesh whose weights are all zero.  (Built from the
    # converted model instead of TrainState.create, whose jitted random init would add
    # ~10 s of compilation to this test.)
    reference, _ = checkpoint_io.load_converted(converted)
    model, _ = checkpoint_io.load_converted(converted)
    nnx.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, checkpoint_io.WEIGHTS)))
    graphdef, fresh = nnx.split((model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)))
    mesh = sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])
    shardings = sharding.state_shardings(fresh, mesh)
    state = train_state.TrainState(graphdef, jax.device_put(fresh, shardings), shardings, mesh)
    logged = []
    pretrain.init_from_model_directory(state, str(converted), log=logged.append)
    for (key, a), b in zip(flat_weights(state.model).items(),
                           flat_weights(reference).values()):
        np.testing.assert_array_equal(a, b, err_msg=key)
    assert logged == [f"model initialised from {converted}"]

    other = checkpoint_io.abstract_ctclip(variant("tiny"))  # validated before assigning
    with pytest.raises(checkpoint_io.ModelDirectoryError,
                       match=f"(?s){converted}.*shape of to_visual_latent/kernel"):
        checkpoint_io.load_weights_into(other, converted)
    gin_setup.parse_gin([], [f"train.init_checkpoint = '{converted}'"])  # a known binding
    gin.clear_config()

    # A pretraining workdir (its checkpoint and config.gin) exports like the directory.
    workdir = tmp_path / "run"
    saver = checkpoints.Checkpointer(str(workdir / "checkpoints"), async_save=False)
    saver.save(3, state.state, {}, {})
    saver.close()
    gin_setup.parse_gin([str(converted / "model.gin")], ["train.model = @CTCLIPConfig()"])
    (workdir / "config.gin").write_text(gin.config_str())
    gin.clear_config()
    from_run, from_dir = tmp_path / "run.pt", tmp_path / "dir.pt"
    for source, out in ((workdir, from_run), (converted, from_dir)):
        assert convert_official.main(["--to-torch", "--from", str(source),
                                      "--out", str(out)]) == 0
    a, b = torch.load(from_run, weights_only=True), torch.load(from_dir, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_path_works_without_torch(converted):
    """With `import torch` failing, the trainer imports and a model directory loads."""
    code = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ImportError('torch is not installed')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "import experiments.pretrain\n"
            "from ct_rate_jax import checkpoint_io\n"
            f"model, _ = checkpoint_io.load_converted({str(converted)!r})\n"
            "print(model.config.dim_latent)\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "32"
