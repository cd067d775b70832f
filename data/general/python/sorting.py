# Sorting in Python: the built-in tools first, then the classic algorithms written by hand.


def sort_numbers(numbers):
    """Return a new list with the numbers in ascending order."""
    return sorted(numbers)


def sort_numbers_descending(numbers):
    """Return a new list with the numbers from largest to smallest."""
    return sorted(numbers, reverse=True)


def sort_in_place(items):
    """Sort the list itself; list.sort() returns None."""
    items.sort()
    return items


def sort_words_ignoring_case(words):
    """Sort words alphabetically, treating upper and lower case the same."""
    return sorted(words, key=str.lower)


def sort_by_length(words):
    """Sort words from shortest to longest."""
    return sorted(words, key=len)


def sort_people_by_age(people):
    """Sort a list of (name, age) tuples by age."""
    return sorted(people, key=lambda person: person[1])


def sort_dict_by_value(scores):
    """Return the (key, value) pairs of a dict ordered by value, highest first."""
    return sorted(scores.items(), key=lambda item: item[1], reverse=True)


def sort_by_two_keys(records):
    """Sort records by last name, then by first name."""
    return sorted(records, key=lambda r: (r["last"], r["first"]))


def bubble_sort(items):
    """Bubble sort: swap neighbours until no swap is needed."""
    items = list(items)
    n = len(items)
    for i in range(n):
        swapped = False
        for j in range(n - 1 - i):
            if items[j] > items[j + 1]:
                items[j], items[j + 1] = items[j + 1], items[j]
                swapped = True
        if not swapped:
            break
    return items


def selection_sort(items):
    """Selection sort: move the smallest remaining item to the front."""
    items = list(items)
    for i in range(len(items)):
        smallest = i
        for j in range(i + 1, len(items)):
            if items[j] < items[smallest]:
                smallest = j
        items[i], items[smallest] = items[smallest], items[i]
    return items


def insertion_sort(items):
    """Insertion sort: grow a sorted prefix one item at a time."""
    items = list(items)
    for i in range(1, len(items)):
        current = items[i]
        j = i - 1
        while j >= 0 and items[j] > current:
            items[j + 1] = items[j]
            j -= 1
        items[j + 1] = current
    return items


def merge_sort(items):
    """Merge sort: split the list in half, sort each half, then merge them."""
    if len(items) <= 1:
        return list(items)
    middle = len(items) // 2
    left = merge_sort(items[:middle])
    right = merge_sort(items[middle:])
    return merge(left, right)


def merge(left, right):
    """Merge two sorted lists into one sorted list."""
    result = []
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            result.append(left[i])
            i += 1
        else:
            result.append(right[j])
            j += 1
    result.extend(left[i:])
    result.extend(right[j:])
    return result


def quick_sort(items):
    """Quick sort: pick a pivot, put smaller items left and larger items right."""
    if len(items) <= 1:
        return list(items)
    pivot = items[len(items) // 2]
    smaller = [x for x in items if x < pivot]
    equal = [x for x in items if x == pivot]
    larger = [x for x in items if x > pivot]
    return quick_sort(smaller) + equal + quick_sort(larger)


def heap_sort(items):
    """Heap sort with the heapq module."""
    import heapq

    heap = list(items)
    heapq.heapify(heap)
    return [heapq.heappop(heap) for _ in range(len(heap))]


def counting_sort(numbers, max_value):
    """Counting sort for small non-negative integers."""
    counts = [0] * (max_value + 1)
    for number in numbers:
        counts[number] += 1
    result = []
    for value, count in enumerate(counts):
        result.extend([value] * count)
    return result


def is_sorted(items):
    """Check whether a list is already in ascending order."""
    return all(items[i] <= items[i + 1] for i in range(len(items) - 1))


def top_n(numbers, n):
    """The n largest numbers, largest first."""
    return sorted(numbers, reverse=True)[:n]


def median(numbers):
    """The middle value of a list of numbers."""
    ordered = sorted(numbers)
    middle = len(ordered) // 2
    if len(ordered) % 2 == 1:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


if __name__ == "__main__":
    data = [5, 2, 9, 1, 5, 6]
    print(sorted(data))  # [1, 2, 5, 5, 6, 9]
    print(sorted(data, reverse=True))  # [9, 6, 5, 5, 2, 1]
    print(bubble_sort(data))
    print(merge_sort(data))
    print(quick_sort(data))
    words = ["banana", "Apple", "cherry"]
    print(sorted(words, key=str.lower))  # ['Apple', 'banana', 'cherry']
    ages = {"alice": 31, "bob": 25, "carol": 40}
    print(sorted(ages, key=ages.get))  # ['bob', 'alice', 'carol']
