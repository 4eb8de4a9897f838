"""Write recipes/benchmarks/cl_long_order{4,5,6}.yaml: the 15-task long sequence of the standard CL benchmark in
O-LoRA's three long orders (tests/test_cl_compare.py checks the shipped files are what this writes).

Sources:
- Orders: O-LoRA (Wang et al. 2023, after Progressive Prompts). Order 6 is cmnfriend/O-LoRA scripts/long.sh
  (commit 07117e1). Orders 4 and 5 are scripts/order_4.sh and order_5.sh of two O-LoRA-based repositories that
  agree exactly (Hoilap/AS-LoRA b65d18e, thuwng/GORP f6fca37); their order_6.sh equals long.sh.
- Instructions: O-LoRA's configs/instruction_config.json, the question sentence word for word, then the options
  line as cl_standard.yaml words it. COPA has no instruction, as in O-LoRA, because its sentence asks the question.
  dbpedia, amazon, yahoo and agnews are worded as in cl_standard.yaml, and yelp as in cl_standard5.yaml.
- MultiRC, IMDB and Yelp have no test split in ../shared/data: training records are held out.
- 512 tokens: O-LoRA's source length. At 192 tokens only 1 MultiRC test prompt of 200 fits, and 24 of 1000
  training examples keep their label. At 512 every task has at least 56 test prompts that fit.
- MNLI's test split has 131 unlabeled '-' items of 7600; they are left out (data.drop_unknown_answers).

    python scripts/dev/long_recipes.py
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "cl_benchmark"
REL = "../shared/data/cl_benchmark"

NLI = 'What is the logical relationship between the "sentence 1" and the "sentence 2"?'
QQP = 'Whether the "first sentence" and the "second sentence" have the same meaning?'
SC = "What is the sentiment of the following paragraph?"
BOOLQA = "According to the following passage, is the question true or false?"
MULTIRC = "According to the following passage and question, is the candidate answer true or false?"
WIC = "Given a word and two sentences, whether the word is used with the same sense in both sentence?"
TC_DBPEDIA = "What is the topic of the following paragraph?"
REVIEW = "What is the sentiment of the following review?"
TC_YAHOO = "What is the topic of the following question and answer?"
TC_AGNEWS = "What is the topic of the following news article?"

# stage name: (group/dataset, instruction or None, holdout)
TASKS = {
    "mnli": ("NLI/MNLI", NLI, None),
    "cb": ("NLI/CB", NLI, None),
    "rte": ("NLI/RTE", NLI, None),
    "qqp": ("QQP/QQP", QQP, None),
    "wic": ("WiC/WiC", WIC, None),
    "copa": ("COPA/COPA", None, None),
    "boolqa": ("BoolQA/BoolQA", BOOLQA, None),
    "multirc": ("MultiRC/MultiRC", MULTIRC, 200),
    "imdb": ("SC/IMDB", SC, 200),
    "sst2": ("SC/SST-2", SC, None),
    "yelp": ("SC/yelp", REVIEW, 300),
    "amazon": ("SC/amazon", REVIEW, None),
    "dbpedia": ("TC/dbpedia", TC_DBPEDIA, None),
    "yahoo": ("TC/yahoo", TC_YAHOO, None),
    "agnews": ("TC/agnews", TC_AGNEWS, None),
}
UNLABELED = {"mnli"}  # test items labeled '-' (no gold label in GLUE)

ORDERS = {
    4: "mnli cb wic copa qqp boolqa rte imdb yelp amazon sst2 dbpedia agnews multirc yahoo".split(),
    5: "multirc boolqa wic mnli cb copa qqp rte imdb sst2 dbpedia agnews yelp amazon yahoo".split(),
    6: "yelp amazon mnli cb copa qqp rte imdb sst2 dbpedia agnews yahoo multirc boolqa wic".split(),
}


def labels(name: str) -> list[str]:
    return json.loads((DATA / TASKS[name][0] / "labels.json").read_text())


def prompt_template(name: str) -> str:
    sub, instruction, _ = TASKS[name]
    train = json.loads((DATA / sub / "train.json").read_text())
    # the sentences of amazon, yelp, dbpedia, yahoo and agnews end in a newline, the others do not
    ends = {r["sentence"].endswith("\n") for r in train}
    assert len(ends) == 1, (name, ends)
    tail = "{sentence}Answer:" if ends.pop() else "{sentence}\nAnswer:"
    if instruction is None:
        return tail
    return f"{instruction} Choose one from the options.\nOptions: {', '.join(labels(name))}\n{tail}"


def q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def recipe(order: int) -> str:
    names = ORDERS[order]
    assert sorted(names) == sorted(TASKS), names
    lines = [
        f"# SeqFT of SmolLM2-135M-Instruct on the 15-task long sequence of the standard CL benchmark, O-LoRA's order "
        f"{order}:",
        f"# {' -> '.join(names)}.",
        "# Written by scripts/dev/long_recipes.py (its docstring gives the sources of the orders and instructions).",
        f"# Run: llmcl train recipes/benchmarks/cl_long_order{order}.yaml   (reads ../shared/data/cl_benchmark);",
        "# every method: python scripts/bench/cl_compare.py --benchmark long. 10 steps x 8 examples per task at 512 "
        "tokens,",
        "# 30 test items per task scored both ways (generated label, label-set loglikelihood): a multi-hour CPU job.",
        f"name: cl_long_order{order}",
        f"description: SeqFT on the 15-task long sequence, O-LoRA order {order} ({names[0]} -> ... -> {names[-1]})",
        "seed: 0",
        "model:",
        "  path: builtin:smollm2-135m",
        "method:",
        "  name: seqft",
        "train:",
        "  lr: 2.0e-4",
        "  warmup: 0.1",
        "  max_steps: 10",
        "  batch_size: 8",
        "  seq_len: 512",
        "  precision: bf16   # bf16 mixed precision (a GPU's default): 1.6x the fp32 step on a CPU with avx512_bf16",
        "eval:",
        "  limit: 30",
        "  max_prompt_tokens: 504   # test items whose prompt fits train.seq_len with its label",
        "  max_new_tokens: 8",
        "  tasks: [llmcl_arc_easy, llmcl_piqa, llmcl_winogrande]",
        "  tasks_limit: 50",
        "  tasks_every_stage: false",
        "  unseen_stages: next   # a row scores the stage after it (all that FWT reads) ...",
        "  seen_stages: current  # ... and the one just trained (BWT reads it), the last row every stage: 43 cells, not 134",
        "stages:",
    ]
    for name in names:
        sub, _, holdout = TASKS[name]
        lines += [f"  - name: {name}", "    data:", f"      path: {REL}/{sub}"]
        if holdout is not None:
            lines.append(f"      holdout: {holdout}   # no test split in the shared data")
        lines += ["      max_train_samples: 1000",
                  f"      prompt_template: {q(prompt_template(name))}",
                  '      completion_template: " {label}"',
                  f"      choices: [{', '.join(q(c) for c in labels(name))}]"]
        if name in UNLABELED:
            lines.append("      drop_unknown_answers: true   # 131 of 7600 test items are labeled '-'")
    return "\n".join(lines) + "\n"


def main() -> None:
    for order in ORDERS:
        path = REPO / "recipes" / "benchmarks" / f"cl_long_order{order}.yaml"
        path.write_text(recipe(order))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
