# Working with strings in Python.


def reverse_string(text):
    """Return the text backwards."""
    return text[::-1]


def is_palindrome(text):
    """True if the text reads the same forwards and backwards, ignoring case and spaces."""
    cleaned = "".join(ch.lower() for ch in text if ch.isalnum())
    return cleaned == cleaned[::-1]


def count_vowels(text):
    """Count the vowels in a piece of text."""
    return sum(1 for ch in text.lower() if ch in "aeiou")


def word_count(text):
    """Count how many times each word appears."""
    counts = {}
    for word in text.lower().split():
        counts[word] = counts.get(word, 0) + 1
    return counts


def capitalize_words(text):
    """Make the first letter of every word upper case."""
    return " ".join(word.capitalize() for word in text.split())


def remove_punctuation(text):
    """Drop punctuation characters from the text."""
    import string

    return text.translate(str.maketrans("", "", string.punctuation))


def is_anagram(first, second):
    """Two words are anagrams if they use the same letters."""
    return sorted(first.lower()) == sorted(second.lower())


def truncate(text, width):
    """Shorten text to at most width characters, ending with an ellipsis."""
    if len(text) <= width:
        return text
    return text[: width - 3] + "..."


def join_with_commas(items):
    """Join items as "a, b and c"."""
    items = [str(item) for item in items]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def first_non_repeated(text):
    """The first character that appears only once, or None."""
    from collections import Counter

    counts = Counter(text)
    for ch in text:
        if counts[ch] == 1:
            return ch
    return None


def snake_to_camel(name):
    """Turn snake_case into camelCase."""
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)


def camel_to_snake(name):
    """Turn camelCase into snake_case."""
    result = []
    for ch in name:
        if ch.isupper():
            result.append("_")
            result.append(ch.lower())
        else:
            result.append(ch)
    return "".join(result).lstrip("_")


def format_price(amount):
    """Format a number as a price with two decimals."""
    return f"${amount:,.2f}"


def greet(name):
    """Say hello with an f-string."""
    return f"Hello, {name}!"


if __name__ == "__main__":
    print(reverse_string("hello"))  # olleh
    print(is_palindrome("A man, a plan, a canal: Panama"))  # True
    print(count_vowels("programming"))  # 3
    print(word_count("the cat and the hat"))
    print(capitalize_words("hello big world"))  # Hello Big World
    print(is_anagram("listen", "silent"))  # True
    print(join_with_commas(["red", "green", "blue"]))  # red, green and blue
    print(snake_to_camel("user_first_name"))  # userFirstName
    print(format_price(1234.5))  # $1,234.50
    print("Python".upper(), "Python".lower(), len("Python"))
    line = "a,b,c"
    print(line.split(","))  # ['a', 'b', 'c']
    print("  padded  ".strip())  # padded
    print("hello world".replace("world", "there"))  # hello there
