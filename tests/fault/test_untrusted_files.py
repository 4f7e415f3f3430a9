"""Untrusted files are never unpickled: a `.pt` whose unpickling would run code (here:
create a directory) is refused by `experiments.convert_official` with one message
naming the file, and the code does not run."""

import os

import pytest

torch = pytest.importorskip("torch")

from experiments import convert_official  # noqa: E402

pytestmark = pytest.mark.torch


class MakesDirectoryWhenUnpickled:
    """Pickles as the call `os.mkdir(path)`: loading it with plain pickle runs it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def malicious_checkpoint(path, marker):
    """A torch.save file that looks like a state dict but carries the payload."""
    torch.save({"state_dict": {"to_text_latent.weight": torch.zeros(2, 2),
                               "payload": MakesDirectoryWhenUnpickled(marker)}}, path)
    return path


def test_pickle_payload_in_a_pt_file_is_refused_and_never_runs(tmp_path, capsys):
    # The payload is real: an ordinary unpickling runs it.
    control = tmp_path / "control_marker"
    torch.load(malicious_checkpoint(tmp_path / "control.pt", control), weights_only=False)
    assert control.is_dir()

    marker = tmp_path / "marker"
    checkpoint = malicious_checkpoint(tmp_path / "ct_clip.pt", marker)
    out = tmp_path / "converted"
    assert convert_official.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 1
    message = capsys.readouterr().err
    assert message.startswith(f"error: refusing {checkpoint}: it holds Python objects other "
                              "than tensors"), message
    assert "posix.mkdir" in message and message.count("\n") == 1, message
    assert not marker.exists()  # the payload did not run
    assert not out.exists()  # and nothing was written
