"""
CustomJSON: conversations from a JSON Lines file you write yourself (e.g. the identity
conversations of tasks/identity.py), for mid-training and SFT mixtures.

Not for: evaluation (there is no reference to grade against) or tool-output checking.

Format: one JSON object per line, {"messages": [...]}: an optional first "system" message,
then "user" and "assistant" messages alternating, starting with the user and ending with the
assistant. Content is a non-empty str; an assistant's content may also be a non-empty list of
{"type": "text" | "python" | "python_output", "text": str} parts. Blank lines are ignored.
"""

import json
import os
import warnings

from tasks.common import Task

_PART_TYPES = ("text", "python", "python_output")


def check_conversation(obj):
    """Return what is wrong with one decoded JSON line as a str, or None if it is a valid conversation."""
    if not isinstance(obj, dict) or "messages" not in obj:
        return "not an object with a 'messages' key"
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    if isinstance(messages[0], dict) and messages[0].get("role") == "system":
        if not isinstance(messages[0].get("content"), str) or not messages[0]["content"]:
            return "messages[0] (system) must have non-empty str content"
        turns, first = messages[1:], 1
    else:
        turns, first = messages, 0
    if not turns:
        return "there is no user message"
    for k, message in enumerate(turns):
        where = f"messages[{first + k}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"{where} must be an object with 'role' and 'content'"
        expected = "user" if k % 2 == 0 else "assistant"
        if message["role"] != expected:
            return f"{where} has role {message['role']!r} but should be {expected!r} (user and assistant alternate, starting with the user)"
        content = message["content"]
        if isinstance(content, str):
            if not content.strip():
                return f"{where} has empty content"
        elif expected == "assistant" and isinstance(content, list) and content:
            for j, part in enumerate(content):
                if (not isinstance(part, dict) or part.get("type") not in _PART_TYPES
                        or not isinstance(part.get("text"), str) or not part["text"]):
                    return f"{where} part {j} must be {{'type': one of {list(_PART_TYPES)}, 'text': non-empty str}}"
        else:
            return f"{where} content must be a non-empty str" + (" or list of parts" if expected == "assistant" else "")
    if len(turns) % 2 == 1:
        return "the conversation must end with an assistant message"
    return None


class CustomJSON(Task):
    """The valid conversations of a JSONL file, in file order.

    strict=False: malformed lines (bad JSON, no messages, wrong roles or order, empty content)
    are skipped, with one warning listing each line number and what is wrong with it.
    strict=True: any malformed line is an error.

    Raises:
        FileNotFoundError: `filepath` does not exist.
        ValueError: strict=True and some lines are malformed (the message lists them all).
    """

    def __init__(self, filepath, strict=False, **kwargs):
        super().__init__(**kwargs)
        if not os.path.exists(filepath):
            raise FileNotFoundError(f"CustomJSON: no conversations file at {filepath}; create it (one {{\"messages\": [...]}} per line) or fix the path")
        self.filepath = filepath
        self.conversations = []
        problems = []
        with open(filepath, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(f"line {line_no}: bad JSON ({e.msg})")
                    continue
                problem = check_conversation(obj)
                if problem is not None:
                    problems.append(f"line {line_no}: {problem}")
                    continue
                self.conversations.append({"messages": obj["messages"]})
        if problems:
            summary = f"{filepath}: {len(problems)} malformed line(s):\n  " + "\n  ".join(problems)
            if strict:
                raise ValueError(f"CustomJSON: {summary}\nFix or delete these lines.")
            warnings.warn(f"CustomJSON skipped {summary}", stacklevel=2)

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]
