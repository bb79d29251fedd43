"""What `meshplan train`'s progress bar shows after each RL step: reward, accuracy, response length, value loss."""
from __future__ import annotations


def postfix(rec: dict, held_out: float | None) -> dict[str, str]:
    """tqdm's postfix for one step's record: the step's mean reward, its samples' accuracy, the latest held-out
    accuracy (rec's own when it was evaluated), mean response length in tokens, and the critic's loss (PPO/VAPO)."""
    out = {"reward": f"{rec['reward']:.3f}", "acc": f"{rec['accuracy']:.3f}"}
    held_out = rec.get("eval_accuracy", held_out)
    if held_out is not None:
        out["eval"] = f"{held_out:.3f}"
    out["len"] = f"{rec['response_len']:.1f}"
    if "value_loss" in rec:
        out["vloss"] = f"{rec['value_loss']:.4f}"
    return out
