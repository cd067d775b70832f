# Files, exceptions, and the standard library.

import csv
import json
from datetime import date, timedelta
from pathlib import Path


def read_lines(path):
    """Read a text file and return its lines without newline characters."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def write_text(path, text):
    """Write text to a file, replacing what was there."""
    Path(path).write_text(text, encoding="utf-8")


def append_line(path, line):
    """Add one line to the end of a file."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def load_json(path):
    """Read a JSON file into Python objects."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_json(path, data):
    """Write Python objects to a JSON file."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def read_csv_rows(path):
    """Read a CSV file with a header into a list of dicts."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def safe_divide(a, b):
    """Divide a by b, returning None instead of raising on division by zero."""
    try:
        return a / b
    except ZeroDivisionError:
        return None


def parse_int(text, default=0):
    """Turn text into an int, or return a default if it is not a number."""
    try:
        return int(text)
    except ValueError:
        return default


def count_python_files(folder):
    """Count the .py files under a folder."""
    return sum(1 for _ in Path(folder).rglob("*.py"))


def days_until(target):
    """How many days from today until a date."""
    return (target - date.today()).days


def next_week():
    """The date seven days from today."""
    return date.today() + timedelta(days=7)


class InsufficientStock(Exception):
    """Raised when an order asks for more than the warehouse has."""


def take_from_stock(stock, item, quantity):
    available = stock.get(item, 0)
    if quantity > available:
        raise InsufficientStock(f"only {available} {item} left")
    stock[item] = available - quantity
    return stock[item]


def retry(function, attempts=3):
    """Call a function until it succeeds or the attempts run out."""
    last_error = None
    for _ in range(attempts):
        try:
            return function()
        except Exception as error:
            last_error = error
    raise last_error


if __name__ == "__main__":
    print(safe_divide(10, 2))  # 5.0
    print(safe_divide(1, 0))  # None
    print(parse_int("42"), parse_int("forty two"))  # 42 0
    data = {"name": "Ada", "languages": ["Python", "C"]}
    print(json.dumps(data))
    print(json.loads('{"a": 1}')["a"])  # 1
    try:
        take_from_stock({"apples": 2}, "apples", 5)
    except InsufficientStock as error:
        print("error:", error)
    finally:
        print("done")
