"""Markdown summary of a training run, from its JSON sidecar, for a CI job page.

    python report/job_summary.py models/mnist_model_20261203_101500.json
    python report/job_summary.py NEW.json --previous OLD.json --artifact mnist-model

With --previous (the sidecar of an earlier run, say the last one on the default branch) every
figure gets its change beside it, so that the page answers "did this change make the model
better?". A missing or unreadable --previous is reported on stderr and left out, so that a first
run or an expired artifact does not fail the job. Only the standard library is used.
"""

import argparse
import json
import sys
from pathlib import Path

CONFUSIONS_SHOWN = 5


def load_sidecar(path):
    return json.loads(Path(path).read_text())


def signed(value, digits):
    """A change with its sign; zero is shown plainly."""
    text = f"{value:+,.{digits}f}"
    return text.lstrip("+-") if float(text.replace(",", "")) == 0 else text


def headline_rows(run):
    """(label, key, decimals, unit) of each figure of the main table, as far as the run has it."""
    rows = [
        ("test accuracy", "test_accuracy", 2, "%"),
        ("train accuracy", "train_accuracy", 2, "%"),
        ("test loss", "test_loss", 4, ""),
        ("parameters", "parameters", 0, ""),
        ("training loop", "train_seconds", 2, " s"),
        ("images per second", "images_per_second", 0, ""),
    ]
    return [row for row in rows if row[1] in run]


def most_frequent_confusions(matrix, limit=CONFUSIONS_SHOWN):
    """[(count, true, predicted)] of the largest off-diagonal cells, largest first."""
    cells = [(count, true, predicted)
             for true, row in enumerate(matrix)
             for predicted, count in enumerate(row)
             if true != predicted and count > 0]
    return sorted(cells, key=lambda cell: (-cell[0], cell[1], cell[2]))[:limit]


def render(run, previous=None, artifact=None):
    """The summary as Markdown text."""
    lines = []
    headline = f"## MNIST model: {run['test_accuracy']:.2f}% test accuracy"
    if previous is not None:
        change = run["test_accuracy"] - previous["test_accuracy"]
        verdict = "better than" if change > 0 else "worse than" if change < 0 else "the same as"
        headline += f", {verdict} the previous run ({signed(change, 2)} points)"
    lines += [headline, ""]

    if previous is None:
        lines += ["| | this run |", "|---|---:|"]
    else:
        lines += ["| | this run | previous run | change |", "|---|---:|---:|---:|"]
    for label, key, digits, unit in headline_rows(run):
        row = f"| {label} | {run[key]:,.{digits}f}{unit} |"
        if previous is not None and key in previous:
            change_unit = " points" if unit == "%" else unit  # a change of a percentage
            row += (f" {previous[key]:,.{digits}f}{unit} |"
                    f" {signed(run[key] - previous[key], digits)}{change_unit} |")
        elif previous is not None:
            row += " | |"
        lines.append(row)
    lines.append("")

    if "per_class_accuracy" in run:
        digits = range(len(run["per_class_accuracy"]))
        lines += ["### Accuracy per digit", "",
                  "| digit | " + " | ".join(str(d) for d in digits) + " |",
                  "|---|" + "---:|" * len(digits),
                  "| this run | " + " | ".join(f"{a:.2f}" for a in run["per_class_accuracy"])
                  + " |"]
        if previous is not None and "per_class_accuracy" in previous:
            changes = [signed(a - b, 2) for a, b in
                       zip(run["per_class_accuracy"], previous["per_class_accuracy"])]
            lines.append("| change | " + " | ".join(changes) + " |")
        lines.append("")

    if "confusion_matrix" in run:
        lines += ["### Most frequent confusions", ""]
        with_previous = previous is not None and "confusion_matrix" in previous
        header = "| true | predicted as | this run |" + (" previous run |" if with_previous else "")
        lines += [header, "|---:|---:|---:|" + ("---:|" if with_previous else "")]
        for count, true, predicted in most_frequent_confusions(run["confusion_matrix"]):
            row = f"| {true} | {predicted} | {count} |"
            if with_previous:
                row += f" {previous['confusion_matrix'][true][predicted]} |"
            lines.append(row)
        lines.append("")

    if previous is None:
        lines += ["No earlier run to compare with.", ""]
    if artifact:
        lines += [f"The checkpoint `{run.get('checkpoint', '?')}`, its sidecar and the picture of "
                  f"its mistakes are in the artifact `{artifact}`.", ""]
    lines.append(run_details(run))
    return "\n".join(lines) + "\n"


def run_details(run):
    """One line of what produced the run: settings, device, software, commit."""
    parts = [f"seed {run.get('seed')}", f"batch {run.get('batch_size')}", f"lr {run.get('lr')}",
             f"{run.get('epochs')} epoch" + ("" if run.get("epochs") == 1 else "s")]
    if "device" in run:
        parts.append(f"{run.get('precision', 'float32')} on {run['device']} "
                     f"({run.get('threads')} threads)")
    versions = run.get("versions") or {}
    if versions:
        parts.append(", ".join(f"{name} {version}" for name, version in versions.items()))
    git = run.get("git")
    if git:
        parts.append(f"commit {git['commit'][:12]}" + (" with local changes" if git["dirty"]
                                                       else ""))
    return "Run: " + "; ".join(parts) + "."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sidecar", help="the run's JSON sidecar")
    parser.add_argument("--previous", help="sidecar of an earlier run to compare with")
    parser.add_argument("--artifact", help="name of the CI artifact that holds the files")
    args = parser.parse_args(argv)

    run = load_sidecar(args.sidecar)
    previous = None
    if args.previous:
        try:
            previous = load_sidecar(args.previous)
        except (OSError, ValueError) as error:
            print(f"warning: no comparison, could not read {args.previous}: {error}",
                  file=sys.stderr)
    sys.stdout.write(render(run, previous, args.artifact))
    return 0


if __name__ == "__main__":
    sys.exit(main())
