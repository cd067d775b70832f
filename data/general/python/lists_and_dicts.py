# Lists, dictionaries, sets and tuples.


def find_max(numbers):
    """Return the largest number without using max()."""
    largest = numbers[0]
    for number in numbers[1:]:
        if number > largest:
            largest = number
    return largest


def average(numbers):
    """The arithmetic mean of a list of numbers."""
    return sum(numbers) / len(numbers)


def remove_duplicates(items):
    """Remove duplicates but keep the original order."""
    seen = set()
    result = []
    for item in items:
        if item not in seen:
            seen.add(item)
            result.append(item)
    return result


def flatten(nested):
    """Flatten a list of lists into one list."""
    return [item for sublist in nested for item in sublist]


def chunk(items, size):
    """Split a list into pieces of the given size."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def squares(n):
    """The squares of 0 to n - 1, with a list comprehension."""
    return [i * i for i in range(n)]


def even_numbers(numbers):
    """Keep only the even numbers."""
    return [n for n in numbers if n % 2 == 0]


def pairs_to_dict(pairs):
    """Build a dict from a list of (key, value) pairs."""
    return dict(pairs)


def invert_dict(mapping):
    """Swap keys and values."""
    return {value: key for key, value in mapping.items()}


def merge_dicts(first, second):
    """Merge two dicts; values in the second win."""
    return {**first, **second}


def group_by_first_letter(words):
    """Group words by their first letter."""
    from collections import defaultdict

    groups = defaultdict(list)
    for word in words:
        groups[word[0]].append(word)
    return dict(groups)


def most_common(items):
    """The most frequent item in a list."""
    from collections import Counter

    return Counter(items).most_common(1)[0][0]


def common_elements(first, second):
    """Items that appear in both lists, using sets."""
    return sorted(set(first) & set(second))


def rotate(items, k):
    """Rotate a list to the right by k places."""
    if not items:
        return items
    k %= len(items)
    return items[-k:] + items[:-k]


def running_total(numbers):
    """Cumulative sums of a list."""
    total = 0
    result = []
    for number in numbers:
        total += number
        result.append(total)
    return result


def zip_names_and_ages(names, ages):
    """Pair names with ages using zip."""
    return list(zip(names, ages, strict=True))


def get_with_default(mapping, key):
    """Look up a key and fall back to zero if it is missing."""
    return mapping.get(key, 0)


def binary_search(items, target):
    """Find target in a sorted list and return its index, or -1."""
    low, high = 0, len(items) - 1
    while low <= high:
        middle = (low + high) // 2
        if items[middle] == target:
            return middle
        if items[middle] < target:
            low = middle + 1
        else:
            high = middle - 1
    return -1


if __name__ == "__main__":
    fruits = ["apple", "banana", "cherry"]
    fruits.append("date")
    fruits.insert(0, "apricot")
    fruits.remove("banana")
    print(fruits, len(fruits))
    print(fruits[0], fruits[-1], fruits[1:3])
    for index, fruit in enumerate(fruits):
        print(index, fruit)
    prices = {"apple": 0.5, "bread": 2.25}
    prices["milk"] = 1.2
    for name, price in prices.items():
        print(name, price)
    print("apple" in prices)  # True
    print(remove_duplicates([3, 1, 3, 2, 1]))  # [3, 1, 2]
    print(flatten([[1, 2], [3], [4, 5]]))  # [1, 2, 3, 4, 5]
    print(binary_search([1, 3, 5, 7, 9], 7))  # 3
