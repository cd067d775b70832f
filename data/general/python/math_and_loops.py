# Numbers, loops and recursion.


def factorial(n):
    """n! computed with a loop."""
    result = 1
    for i in range(2, n + 1):
        result *= i
    return result


def factorial_recursive(n):
    """n! computed recursively."""
    if n <= 1:
        return 1
    return n * factorial_recursive(n - 1)


def fibonacci(n):
    """The first n Fibonacci numbers."""
    numbers = []
    a, b = 0, 1
    for _ in range(n):
        numbers.append(a)
        a, b = b, a + b
    return numbers


def is_prime(n):
    """True if n is a prime number."""
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def primes_up_to(limit):
    """All primes up to limit with the sieve of Eratosthenes."""
    is_candidate = [True] * (limit + 1)
    is_candidate[0:2] = [False, False]
    for i in range(2, int(limit**0.5) + 1):
        if is_candidate[i]:
            for multiple in range(i * i, limit + 1, i):
                is_candidate[multiple] = False
    return [i for i, prime in enumerate(is_candidate) if prime]


def gcd(a, b):
    """Greatest common divisor with Euclid's algorithm."""
    while b:
        a, b = b, a % b
    return a


def lcm(a, b):
    """Least common multiple."""
    return a * b // gcd(a, b)


def sum_of_digits(n):
    """Add up the digits of a non-negative integer."""
    return sum(int(digit) for digit in str(n))


def celsius_to_fahrenheit(celsius):
    """Convert a temperature from Celsius to Fahrenheit."""
    return celsius * 9 / 5 + 32


def fahrenheit_to_celsius(fahrenheit):
    """Convert a temperature from Fahrenheit to Celsius."""
    return (fahrenheit - 32) * 5 / 9


def is_leap_year(year):
    """Leap years are divisible by 4, except centuries not divisible by 400."""
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def fizzbuzz(n):
    """Print the numbers 1 to n, replacing multiples of 3 and 5."""
    for i in range(1, n + 1):
        if i % 15 == 0:
            print("FizzBuzz")
        elif i % 3 == 0:
            print("Fizz")
        elif i % 5 == 0:
            print("Buzz")
        else:
            print(i)


def power(base, exponent):
    """Raise base to a non-negative integer power by repeated squaring."""
    result = 1
    while exponent > 0:
        if exponent % 2 == 1:
            result *= base
        base *= base
        exponent //= 2
    return result


def count_down(n):
    """Count down from n to 1 with a while loop."""
    while n > 0:
        print(n)
        n -= 1
    print("Lift off!")


def multiplication_table(n):
    """Print an n by n multiplication table."""
    for row in range(1, n + 1):
        print(" ".join(f"{row * col:3d}" for col in range(1, n + 1)))


def hanoi(n, source, target, spare, moves=None):
    """Solve the towers of Hanoi and return the list of moves."""
    if moves is None:
        moves = []
    if n > 0:
        hanoi(n - 1, source, spare, target, moves)
        moves.append((source, target))
        hanoi(n - 1, spare, target, source, moves)
    return moves


if __name__ == "__main__":
    print(factorial(5))  # 120
    print(fibonacci(10))  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]
    print(is_prime(17))  # True
    print(primes_up_to(30))
    print(gcd(48, 18))  # 6
    print(celsius_to_fahrenheit(100))  # 212.0
    print(is_leap_year(2024))  # True
    print(round(3.14159, 2))  # 3.14
    print(abs(-7), min(4, 2, 8), max(4, 2, 8))
    print(10 // 3, 10 % 3, 2**10)  # 3 1 1024
    total = 0
    for i in range(1, 11):
        total += i
    print(total)  # 55
