"""Side-by-side benchmark: this project's `python train.py` against the usual DataLoader recipe.

    python bench/benchmark.py               # seeds 0-4 for each recipe, about 4 minutes on 2 cores
    python bench/benchmark.py --seeds 0 1   # fewer repeats

The usual recipe is what most MNIST repositories do: a DataLoader over torchvision's MNIST with
per-image ToTensor and Normalize transforms, batch 64, Adam(lr=1e-3), one epoch, the same
SimpleCNN. Each run is a fresh process, and the two recipes alternate, so that both see the same
machine load. Reported per recipe: the training loop's seconds (median), test accuracy (mean and
minimum over the seeds) and the peak resident memory of the whole process. For the project, its
throughput is set beside the machine's arithmetic limit for this network: the best float32 matmul
rate measured here divided by the network's floating-point operations per training image.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import train  # noqa: E402


def run_child(command):
    """Run a command to completion; return its stdout and its peak resident memory in MiB.

    That peak covers the whole process, including the interpreter's shutdown, which on this
    torch build touches over 100 MiB more than the run itself; the run's own peak, measured at
    its end, is reported beside it.
    """
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}")
    return stdout, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def run_project(seed, data_dir, out_dir):
    """The project's own entry point, exactly as a user runs it."""
    _, peak_mib = run_child([sys.executable, "train.py", "--seed", str(seed),
                             "--data-dir", str(data_dir), "--out-dir", str(out_dir)])
    sidecar = train.read_sidecar(train.newest_checkpoint(out_dir))
    return dict(seconds=sidecar["train_seconds"], accuracy=sidecar["test_accuracy"],
                peak_mib=peak_mib, run_peak_mib=sidecar["peak_memory_mib"])


def run_dataloader_recipe(seed, data_dir):
    stdout, peak_mib = run_child([sys.executable, __file__, "--dataloader-child",
                                  "--seeds", str(seed), "--data-dir", str(data_dir)])
    return dict(json.loads(stdout), peak_mib=peak_mib)


def dataloader_child(seed, data_dir):
    """The usual recipe, run inside a child process; prints its figures as JSON."""
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    to_input = transforms.Compose([transforms.ToTensor(),
                                   transforms.Normalize((train.MNIST_MEAN,), (train.MNIST_STD,))])
    train_set = datasets.MNIST(data_dir, train=True, transform=to_input)
    test_set = datasets.MNIST(data_dir, train=False, transform=to_input)
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True)
    model = train.SimpleCNN()
    torch.nn.init.kaiming_uniform_(model.fc2.weight, a=5 ** 0.5)  # PyTorch's default init
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    model.train()
    started = time.perf_counter()
    for images, labels in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    seconds = time.perf_counter() - started

    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(test_set, batch_size=1000):
            correct += (model(images).argmax(1) == labels).sum().item()
    print(json.dumps(dict(seconds=seconds, accuracy=100 * correct / len(test_set),
                          run_peak_mib=train.peak_memory_mib())))


def flops_per_training_image():
    """Floating-point operations of one forward and backward pass of SimpleCNN for one image.

    Multiply-adds of each convolution and linear layer, two operations each; the backward pass
    costs about twice the forward (gradients for the weights and for the inputs).
    """
    model = train.SimpleCNN()
    multiply_adds = 0

    def count(module, inputs, output):
        nonlocal multiply_adds
        multiply_adds += output[0].numel() * module.weight[0].numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    return 3 * 2 * multiply_adds


def measured_peak_flops(size=2048, repeats=10):
    """The best float32 matmul rate this process reaches, in FLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def summarize(name, runs):
    seconds = statistics.median(run["seconds"] for run in runs)
    accuracies = [run["accuracy"] for run in runs]
    peak = max(run["peak_mib"] for run in runs)
    run_peak = max(run["run_peak_mib"] for run in runs)
    print(f"{name:<22} {seconds:8.2f} s  {statistics.mean(accuracies):7.2f}%  "
          f"{min(accuracies):7.2f}%  {peak:7.0f} MiB  {run_peak:7.0f} MiB   "
          + " ".join(f"{a:.2f}" for a in accuracies))
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="one run of each recipe per seed")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--dataloader-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.dataloader_child:
        dataloader_child(args.seeds[0], args.data_dir)
        return

    train.fetch_mnist(args.data_dir)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; seeds {' '.join(map(str, args.seeds))}")
    project, usual = [], []
    with tempfile.TemporaryDirectory() as out_dir:
        for seed in args.seeds:
            usual.append(run_dataloader_recipe(seed, args.data_dir))
            project.append(run_project(seed, args.data_dir, out_dir))
            print(f"  seed {seed}: DataLoader {usual[-1]['seconds']:.2f} s "
                  f"{usual[-1]['accuracy']:.2f}%, train.py {project[-1]['seconds']:.2f} s "
                  f"{project[-1]['accuracy']:.2f}%", flush=True)

    print(f"\n{'recipe':<22} {'loop':>10}  {'mean acc':>8}  {'min acc':>8}  {'process':>11}"
          f"  {'run':>11}   accuracy per seed")
    usual_seconds = summarize("DataLoader, batch 64", usual)
    project_seconds = summarize("python train.py", project)
    print(f"\nspeed-up of the training loop: {usual_seconds / project_seconds:.1f}x")

    flops = flops_per_training_image()
    peak_flops = measured_peak_flops()
    limit = peak_flops / flops
    achieved = 60_000 / project_seconds
    print(f"throughput: {achieved:,.0f} images/s; arithmetic limit {limit:,.0f} images/s "
          f"({flops / 1e6:.2f} MFLOP per image at {peak_flops / 1e9:.0f} GFLOP/s matmul), "
          f"{100 * achieved / limit:.1f}% of it")


if __name__ == "__main__":
    main()
