"""
SmolTalk: general chat conversations for mid-training and SFT.

Not for: evaluation (replies are free-form, there is nothing to grade).

Data: HuggingFaceTB/smol-smoltalk on the Hugging Face Hub
(https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk, Apache-2.0), splits "train"
(~460K conversations) and "test" (~24K). Each row has "messages": a list of
{"role": "system" | "user" | "assistant", "content": str}.
"""

from tasks.common import Task, load_hub_dataset


class SmolTalk(Task):
    """SmolTalk conversations, passed through as they are.

    split: "train" or "test". data_files: local JSON Lines with the Hub's columns instead of
    the Hub (see load_hub_dataset).

    Raises:
        ValueError: an unknown split.
        HubUnavailableError: the Hub is unreachable and data_files was not given.
    """

    def __init__(self, split, data_files=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be 'train' or 'test', got {split!r}")
        self.ds = load_hub_dataset("HuggingFaceTB/smol-smoltalk", split=split, data_files=data_files)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        messages = self.ds[index]["messages"]
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
