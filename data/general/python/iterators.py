# Generators, comprehensions, functions as values.

import itertools
from functools import cache, reduce


def count_up_to(limit):
    """A generator that yields 1, 2, ..., limit."""
    n = 1
    while n <= limit:
        yield n
        n += 1


def read_in_batches(items, size):
    """Yield lists of at most size items."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def product_of(numbers):
    """Multiply all numbers together with reduce."""
    return reduce(lambda a, b: a * b, numbers, 1)


def apply_twice(function, value):
    """Functions are values: pass one in and call it twice."""
    return function(function(value))


def make_multiplier(factor):
    """A closure that remembers factor."""

    def multiply(x):
        return x * factor

    return multiply


@cache
def fib(n):
    """Fibonacci with memoization."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def timer(function):
    """A decorator that prints how long a call took."""
    import time

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        print(f"{function.__name__} took {time.perf_counter() - start:.3f}s")
        return result

    return wrapper


def all_pairs(items):
    """Every pair of distinct items."""
    return list(itertools.combinations(items, 2))


def all_orders(items):
    """Every ordering of the items."""
    return list(itertools.permutations(items))


def word_lengths(words):
    """A dict comprehension from word to length."""
    return {word: len(word) for word in words}


def unique_letters(text):
    """A set comprehension of the letters in the text."""
    return {ch for ch in text.lower() if ch.isalpha()}


def describe(*args, **kwargs):
    """Show positional and keyword arguments."""
    return f"args={args} kwargs={kwargs}"


if __name__ == "__main__":
    print(list(count_up_to(5)))  # [1, 2, 3, 4, 5]
    print(list(read_in_batches(range(7), 3)))  # [[0, 1, 2], [3, 4, 5], [6]]
    print(product_of([1, 2, 3, 4]))  # 24
    double = make_multiplier(2)
    print(apply_twice(double, 5))  # 20
    print(fib(30))  # 832040
    print(list(map(str.upper, ["a", "b"])))  # ['A', 'B']
    print(list(filter(lambda n: n > 2, [1, 2, 3, 4])))  # [3, 4]
    print(sum(x * x for x in range(4)))  # 14
    print(any(n < 0 for n in [1, -2, 3]), all(n > 0 for n in [1, 2]))  # True True
    print(describe(1, 2, color="red"))
