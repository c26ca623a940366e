"""What validation looked like, not only its means: full sample trajectories, and the hop count of each question.

Every validation writes `logging.samples` trajectories (prompt, generated text, the search queries and the results
the service returned, the reward and its parts) to run_dir/samples.jsonl and as TensorBoard text, so a reader can
see *how* the policy searches. `question_hops` reads how many hops each question needs from the synthetic world's
files; the per-hop means (val/reward_2hop, val/searches_2hop ...) come from cluster.validation.ValidationLog.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa

from actors.prompts import Question

SAMPLES_FILE = "samples.jsonl"
_SEARCH = re.compile(r"<search>(.*?)</search>", re.S)
_RESULT = re.compile(r"<result>\n?(.*?)\n?</result>", re.S)


def question_hops(files: list[Path]) -> dict[str, int]:
    """{prompt id: hops} for records whose metadata says (the synthetic world's do); ids as load_questions makes them."""
    from qa.readers import read_records

    hops = {}
    for path in files:
        for record in read_records(path):
            if isinstance(record.metadata.get("hops"), int):
                hops[f"{record.source}:{record.id}"] = record.metadata["hops"]
    return hops


def sample_record(row: dict[str, Any], question: Question | None, prompt: str, step: int,
                  hops: int | None) -> dict[str, Any]:
    """One trajectory as a reader wants it: prompt, response, its searches and their results, reward and parts."""
    text = row["response_text"]
    return {
        "step": step, "prompt_id": row["prompt_id"], "hops": hops,
        "question": question.text if question else None,
        "golden_answers": list(question.golden_answers) if question else None,
        "prompt": prompt, "response": text,
        "searches": [q.strip() for q in _SEARCH.findall(text)],
        "results": _RESULT.findall(text),
        "reward": row["reward"], "format_valid": row["format_valid"], "f1": row["f1"], "em": row["em"],
        "answer": row["answer"], "end_reason": row["end_reason"], "num_searches": row["num_searches"],
        "generated_tokens": row["generated_tokens"], "inserted_tokens": row["inserted_tokens"],
    }


def render_markdown(record: dict[str, Any]) -> str:
    """A sample as TensorBoard text (markdown): a header line of the reward parts, then the response verbatim."""
    head = (f"**{record['prompt_id']}** ({record['hops']}-hop) {record['question']} gold {record['golden_answers']}  \n"
            f"reward {record['reward']:.3f}, format valid {record['format_valid']}, F1 {record['f1']:.3f}, "
            f"answer {record['answer']!r}, searches {record['num_searches']}, end {record['end_reason']}")
    body = "\n".join("    " + line for line in record["response"].splitlines())  # indented: shown verbatim
    return f"{head}\n\n{body}"


class ValidationSamples:
    """Writes each validation's sample trajectories, alternating between hop counts."""

    def __init__(self, run_dir: Path, questions: list[Question], tokenizer: Any, template: str, count: int,
                 hops: dict[str, int]) -> None:
        self.path = Path(run_dir) / SAMPLES_FILE
        self.questions = {q.prompt_id: q for q in questions}
        self.tokenizer, self.template, self.count, self.hops = tokenizer, template, count, hops
        self.last: list[dict[str, Any]] = []

    def observe(self, step: int, batches: list[pa.RecordBatch], metrics: Any = None) -> None:
        """Record `count` samples of this validation (JSONL, and TensorBoard text through `metrics`).

        Samples alternate between hop counts so a few of them show both kinds of question."""
        if not batches:
            return
        rows = pa.Table.from_batches(batches).to_pylist()
        by_hop: dict[Any, list[dict[str, Any]]] = {}
        for row in rows:
            by_hop.setdefault(self.hops.get(row["prompt_id"]), []).append(row)
        chosen: list[dict[str, Any]] = []
        while len(chosen) < min(self.count, len(rows)):
            for group in by_hop.values():
                if group and len(chosen) < self.count:
                    chosen.append(group.pop(0))
        from actors.prompts import build_prompt

        self.last = []
        for row in chosen:
            question = self.questions.get(row["prompt_id"])
            prompt = build_prompt(question.text, self.template, self.tokenizer) if question else ""
            self.last.append(sample_record(row, question, prompt, step, self.hops.get(row["prompt_id"])))
        with open(self.path, "a", encoding="utf-8") as out:
            for record in self.last:
                out.write(json.dumps(record) + "\n")
        if metrics is not None:
            for index, record in enumerate(self.last):
                metrics.log_text(f"samples/{index}", render_markdown(record), step)


def read_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every sample record of run_dir/samples.jsonl, in order."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
