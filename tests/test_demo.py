"""`make demo` in miniature: every stage on the shipped tiny world, through the real scripts, then the report."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "run_demo.py"


def test_quick_demo_writes_the_full_report(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output_dir", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    runs = {row["run"] for row in summary["accuracy"]}
    assert runs == {"real"} | {
        f"{g}/{m}" for g in ("datadream_cls", "datadream_dset", "frozen") for m in ("synthetic", "real+synthetic")
    }
    assert set(summary["alignment"]) == {"datadream_cls", "datadream_dset", "frozen"}
    report = (out / "report.md").read_text()
    assert "| frozen/synthetic |" in report and "Frechet" in report
    assert len(json.loads((out / "timings.json").read_text())) == 2 + 3 + 7
    assert set(summary["class_fidelity"]) == {"datadream_cls", "datadream_dset", "frozen", "real test images"}
    for figure in ("grid.png", "alignment.png"):
        assert (out / figure).stat().st_size > 1000

    # A second run resumes: every stage is found finished and skipped.
    again = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output_dir", str(out)], capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already done") == 2 + 3 + 7
