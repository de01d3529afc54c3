"""Print one task's metrics before and after fine-tuning, from two `edgetune eval --json` outputs.

    python examples/tasks/report.py TASK before.json after.json SECONDS
"""
import json
import sys

METRICS = {
    "classification": ["accuracy", "macro_f1"],
    "qa": ["exact_match", "f1"],
    "translation": ["chrf", "bleu"],
    "ner": ["f1", "precision", "recall", "malformed"],
    "chat": ["distinct_2", "mean_words"],
    "creative": ["distinct_2", "mean_words"],
    "domain": [],
}


def main() -> None:
    task, before, after, seconds = sys.argv[1], *(json.load(open(p)) for p in sys.argv[2:4]), int(sys.argv[4])
    rows = [("loss", before["loss"], after["loss"]), ("perplexity", before["perplexity"], after["perplexity"])]
    for k in METRICS[task]:
        rows.append((k, before["task_metrics"][k], after["task_metrics"][k]))
    n = before.get("task_metrics", before).get("examples", before.get("examples"))
    print(f"\n=== {task}: {n} held-out test examples, before -> after fine-tuning ===")
    for k, b, a in rows:
        print(f"{k:>12}: {b:10.4f} -> {a:10.4f}" if isinstance(b, float) else f"{k:>12}: {b:>10} -> {a:>10}")
    print(f"{'wall time':>12}: {seconds // 60} min {seconds % 60} s (export excluded if the bundle existed)")
    print(json.dumps({"task": task, "seconds": seconds, "before": {k: b for k, b, _ in rows},
                      "after": {k: a for k, _, a in rows}}))


if __name__ == "__main__":
    main()
