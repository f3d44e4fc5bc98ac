"""Tiny deterministic corpora for the vocabulary-extension tests.

English: docstrings of standard-library modules (`inspect.getdoc`), split into paragraphs.
Vietnamese-like: sentences drawn from ~200 common Vietnamese syllables (with their diacritics)
under a Zipf-like distribution, from a seeded RNG.
"""

from __future__ import annotations

import importlib
import inspect
import random
import unicodedata
import warnings

_MODULES = [
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "glob", "gzip", "hashlib", "heapq",
    "hmac", "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mimetypes",
    "numbers", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "shlex", "shutil", "smtplib",
    "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "types", "typing", "unittest", "urllib.parse", "uuid",
    "warnings", "weakref", "zipfile", "zlib",
]

VIETNAMESE_WORDS = """
tôi bạn anh chị em chúng ta họ người nhà nước việt nam là của và có không được trong cho với này đó những
các một hai ba bốn năm sáu bảy tám chín mười đi đến về làm ăn uống nói học biết thấy muốn cần phải sẽ đã
đang rất lắm nhiều ít lớn nhỏ đẹp tốt xấu mới cũ ngày đêm sáng chiều tối hôm nay mai qua tháng tuần giờ
phút thời gian trường lớp sách vở bút bàn ghế cửa sổ đường phố thành làng quê hương sông núi biển trời mưa
nắng gió mây cây hoa lá quả chim cá chó mèo gà bò lợn trâu cơm phở bánh mì trà cà phê sữa thịt rau gạo
muối tiền chợ mua bán giá đắt rẻ công việc gia đình cha mẹ ông bà con cháu vợ chồng bè yêu thương vui buồn
giận sợ nhớ quên hiểu nghĩ đọc viết nghe nhìn chơi ngủ thức dậy chạy đứng ngồi nằm mở đóng bắt đầu kết thúc
giúp đỡ hỏi trả lời câu chuyện tiếng chữ văn hóa lịch sử khoa kinh tế xã hội chính trị đất dân tộc quốc thế
giới điện thoại máy tính xe đạp bay tàu hỏa bệnh viện bác sĩ thuốc khỏe mạnh yếu đau ốm
""".split()


def english_paragraphs() -> list[str]:
    """Paragraphs of the module and member docstrings, in a fixed order, deduplicated."""
    seen, out = set(), []
    for name in _MODULES:
        mod = importlib.import_module(name)
        objs = [mod] + [getattr(mod, a) for a in sorted(vars(mod)) if not a.startswith("_")]
        for obj in objs:
            with warnings.catch_warnings():  # e.g. typing.io's DeprecationWarning on access
                warnings.simplefilter("ignore")
                doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            for para in (doc or "").split("\n\n"):
                para = " ".join(para.split())
                if len(para) >= 60 and para not in seen:
                    seen.add(para)
                    out.append(para)
    return out


def vietnamese_paragraphs(n: int, seed: int = 0) -> list[str]:
    """`n` paragraphs of 2-5 sentences of 4-14 words each; NFC-normalised."""
    rng = random.Random(seed)
    words = list(dict.fromkeys(VIETNAMESE_WORDS))
    weights = [1 / (r + 5) for r in range(len(words))]  # Zipf-like, flattened at the head
    out = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            s = rng.choices(words, weights, k=rng.randint(4, 14))
            sentences.append(" ".join(s).capitalize() + rng.choice([".", ".", ".", "?", "!"]))
        out.append(unicodedata.normalize("NFC", " ".join(sentences)))
    return out


def write_vi_corpus(data_dir, n: int = 3000, seed: int = 0, name: str = "part-0.jsonl"):
    """Write `n` Vietnamese-like paragraphs as DATA_DIR/vi/NAME (jsonl, field "text"), where the
    tiny-vocab-demo preset reads its target language (${CPT_DATA}/vi/*.jsonl). Returns the path."""
    import json
    from pathlib import Path

    out = Path(data_dir) / "vi"
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    with open(path, "w", encoding="utf-8") as f:
        for p in vietnamese_paragraphs(n, seed):
            f.write(json.dumps({"text": p}, ensure_ascii=False) + "\n")
    return path
