"""
ARC (the AI2 Reasoning Challenge): grade-school science multiple choice, for SFT and evaluation.

Not for: CORE-style few-shot scoring of base models (nanochat/core_eval.py).

Data: allenai/ai2_arc on the Hugging Face Hub (https://huggingface.co/datasets/allenai/ai2_arc,
CC BY-SA 4.0), subsets "ARC-Easy" and "ARC-Challenge", splits "train", "validation", "test".
Rows: "id", "question" str, "choices" {"text": [str], "label": [str]}, "answerKey" str. Most
questions have four choices labelled A-D; a few have three or five, or labels 1-4, which are
relabelled A, B, C, ... in order.
"""

from tasks.common import Task, load_hub_dataset, render_mc


class ARC(Task):
    """ARC as categorical multiple choice: the assistant answers with one letter.

    subset: "ARC-Easy" or "ARC-Challenge"; split: "train", "validation" or "test".
    data_files: local JSON Lines with the Hub's columns instead of the Hub.

    Raises:
        ValueError: an unknown subset or split.
        HubUnavailableError: the Hub is unreachable and data_files was not given.
    """

    eval_type = "categorical"

    def __init__(self, subset, split, data_files=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be 'ARC-Easy' or 'ARC-Challenge', got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be 'train', 'validation' or 'test', got {split!r}")
        self.ds = load_hub_dataset("allenai/ai2_arc", subset, split=split, data_files=data_files)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        letters = [chr(ord("A") + k) for k in range(len(texts))]
        answer = letters[labels.index(row["answerKey"])]
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, texts)},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,
        }

    def evaluate(self, conversation, completion):
        """True if `completion` (the predicted letter) is the correct letter."""
        return completion.strip() == conversation["messages"][-1]["content"]
