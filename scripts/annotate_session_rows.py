"""Run once (2026-12-02, third session): annotate the rows that sweeps started before
``examples/reproduce.py`` recorded ``host`` and ``teacher_best_val_f1`` wrote in that session.

Rows absent at commit 8210b17 (the session's start) get the session's host and, for students
that used a teacher, that teacher's best validation F1 from its ``log.jsonl`` under
``runs/reproduce``. Kept for the record; the sweeps write both fields themselves now.

    python scripts/annotate_session_rows.py
"""
import json, subprocess, sys
sys.path.insert(0, ".")
from hicd_core.experiment import write_json
from pathlib import Path
HOST = "x86_64, 2 CPUs (Intel(R) Xeon(R) Processor), backend numpy"
BASE = "8210b17"
for study in ("converged", "sztaki"):
    path = Path(f"results/{study}.json")
    old = json.loads(subprocess.run(["git", "show", f"{BASE}:{path}"], capture_output=True, text=True, check=True).stdout)
    key = lambda r: (r["setting"], r["method"], r["seed"], r.get("init", "fresh"))
    old_keys = {key(r) for r in old}
    rows = json.loads(path.read_text())
    changed = []
    for r in rows:
        if key(r) in old_keys or "host" in r:
            continue
        r["host"] = HOST
        used_teacher = r["method"].startswith("student") and (r["method"] != "student baseline" or r.get("init") == "teacher")
        if used_teacher:
            log = Path(f"runs/reproduce/{study}/seed{r['seed']}/teacher/log.jsonl")
            r["teacher_best_val_f1"] = max(json.loads(l)["val"]["f1"] for l in log.read_text().splitlines() if l.strip())
        changed.append((key(r), r.get("teacher_best_val_f1")))
    write_json(path, rows)
    print(study, changed)
