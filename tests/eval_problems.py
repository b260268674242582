"""HumanEval problems (its published JSONL fields) small enough for a model trained a few
steps: what the sampling tests, in process and on Ray, evaluate."""

ADD_PROBLEMS = [
    {
        "task_id": f"HumanEval/{i}",
        "prompt": f'def add{i}(a, b):\n    """Add two numbers."""\n',
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
        "entry_point": f"add{i}",
    }
    for i in range(3)
]
