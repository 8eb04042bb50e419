"""
GSM8K: grade-school math word problems whose worked solutions call the calculator tool, for
mid-training, SFT, RL and evaluation.

Not for: running the tool (nanochat/engine.py does that while sampling).

Data: openai/gsm8k on the Hugging Face Hub (https://huggingface.co/datasets/openai/gsm8k, MIT),
subset "main", splits "train" (7,473) and "test" (1,319). Rows: "question" str and "answer" str:
the worked solution, with calculator annotations "<<48/2=24>>" and a last line "#### 72".
"""

import re

from tasks.common import Task, assistant_text, final_answers_match, load_hub_dataset

_ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")


def parse_gsm8k_answer(answer):
    """A GSM8K solution string -> assistant content parts.

    Each "<<expr=result>>" becomes a {"type": "python", "text": expr} call followed by its
    {"type": "python_output", "text": result}; the text between annotations (the "#### N" line
    included) stays as "text" parts, so the assistant learns to call the tool where the
    annotation was and to copy the result into its prose.
    """
    parts = []
    pos = 0
    for match in _ANNOTATION_RE.finditer(answer):
        if match.start() > pos:
            parts.append({"type": "text", "text": answer[pos:match.start()]})
        expr, equals, result = match.group(1).rpartition("=")
        if equals:  # an annotation without "=" has no call to make and is dropped
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        pos = match.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


class GSM8K(Task):
    """GSM8K as a generative task graded by the final "#### N" answer.

    split: "train" or "test". data_files: local JSON Lines with the Hub's columns instead of
    the Hub.

    Raises:
        ValueError: an unknown split.
        HubUnavailableError: the Hub is unreachable and data_files was not given.
    """

    def __init__(self, split, data_files=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
        self.ds = load_hub_dataset("openai/gsm8k", "main", split=split, data_files=data_files)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": parse_gsm8k_answer(row["answer"])},
        ]}

    def evaluate(self, conversation, completion):
        """True if the number after "####" in `completion` equals the reference's (commas ignored)."""
        return final_answers_match(assistant_text(conversation), completion)
