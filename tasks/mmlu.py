"""
MMLU: four-choice questions over 57 subjects, for mid-training (the auxiliary_train subset
teaches the multiple-choice answer format) and evaluation (the "all" subset's test split).

Not for: CORE-style few-shot scoring of base models (nanochat/core_eval.py).

Data: cais/mmlu on the Hugging Face Hub (https://huggingface.co/datasets/cais/mmlu, MIT).
Subset "all": splits "auxiliary_train", "dev", "validation", "test"; subset "auxiliary_train":
split "train". Rows: "question" str, "subject" str, "choices" list of 4 str, "answer" int 0-3.
The auxiliary_train subset wraps each row's fields in a "train" column; both shapes are read.
"""

from tasks.common import Task, load_hub_dataset, render_mc

SPLITS = {"all": ("auxiliary_train", "dev", "validation", "test"), "auxiliary_train": ("train",)}
LETTERS = ("A", "B", "C", "D")


class MMLU(Task):
    """MMLU as categorical multiple choice: the assistant answers with one letter A-D.

    subset: "all" or "auxiliary_train"; split: one of that subset's splits (see SPLITS).
    data_files: local JSON Lines with the Hub's columns instead of the Hub.

    Raises:
        ValueError: an unknown subset or split.
        HubUnavailableError: the Hub is unreachable and data_files was not given.
    """

    eval_type = "categorical"

    def __init__(self, subset, split, data_files=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SPLITS:
            raise ValueError(f"MMLU subset must be one of {list(SPLITS)}, got {subset!r}")
        if split not in SPLITS[subset]:
            raise ValueError(f"MMLU subset {subset!r} has splits {list(SPLITS[subset])}, got {split!r}")
        self.ds = load_hub_dataset("cais/mmlu", subset, split=split, data_files=data_files)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        if isinstance(row.get("train"), dict):
            row = row["train"]
        assert len(row["choices"]) == len(LETTERS), "MMLU questions have four choices"
        answer = LETTERS[row["answer"]]
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, row["choices"])},
                {"role": "assistant", "content": answer},
            ],
            "letters": list(LETTERS),
            "subject": row["subject"],
        }

    def evaluate(self, conversation, completion):
        """True if `completion` (the predicted letter) is the correct letter."""
        return completion.strip() == conversation["messages"][-1]["content"]
