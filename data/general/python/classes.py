# Classes, dataclasses and simple objects.

from dataclasses import dataclass, field


class Dog:
    """A dog with a name that can bark."""

    def __init__(self, name, age):
        self.name = name
        self.age = age

    def bark(self):
        return f"{self.name} says woof!"

    def __repr__(self):
        return f"Dog(name={self.name!r}, age={self.age})"


class BankAccount:
    """A bank account that refuses to go below zero."""

    def __init__(self, owner, balance=0):
        self.owner = owner
        self.balance = balance

    def deposit(self, amount):
        if amount <= 0:
            raise ValueError("deposit must be positive")
        self.balance += amount

    def withdraw(self, amount):
        if amount > self.balance:
            raise ValueError("insufficient funds")
        self.balance -= amount


class Stack:
    """Last in, first out."""

    def __init__(self):
        self._items = []

    def push(self, item):
        self._items.append(item)

    def pop(self):
        return self._items.pop()

    def peek(self):
        return self._items[-1]

    def is_empty(self):
        return not self._items

    def __len__(self):
        return len(self._items)


class Queue:
    """First in, first out, using collections.deque."""

    def __init__(self):
        from collections import deque

        self._items = deque()

    def enqueue(self, item):
        self._items.append(item)

    def dequeue(self):
        return self._items.popleft()

    def __len__(self):
        return len(self._items)


class Shape:
    """A base class; subclasses compute their own area."""

    def area(self):
        raise NotImplementedError


class Rectangle(Shape):
    def __init__(self, width, height):
        self.width = width
        self.height = height

    def area(self):
        return self.width * self.height


class Circle(Shape):
    def __init__(self, radius):
        self.radius = radius

    def area(self):
        import math

        return math.pi * self.radius**2


@dataclass
class Point:
    x: float
    y: float

    def distance_to(self, other):
        return ((self.x - other.x) ** 2 + (self.y - other.y) ** 2) ** 0.5


@dataclass
class ShoppingCart:
    items: list = field(default_factory=list)

    def add(self, name, price):
        self.items.append((name, price))

    def total(self):
        return sum(price for _, price in self.items)


class Temperature:
    """A property that converts between units."""

    def __init__(self, celsius):
        self.celsius = celsius

    @property
    def fahrenheit(self):
        return self.celsius * 9 / 5 + 32


class Node:
    """A node in a singly linked list."""

    def __init__(self, value, next_node=None):
        self.value = value
        self.next = next_node


def linked_list_to_list(head):
    values = []
    while head is not None:
        values.append(head.value)
        head = head.next
    return values


if __name__ == "__main__":
    dog = Dog("Rex", 3)
    print(dog.bark())  # Rex says woof!
    shapes = [Rectangle(2, 3), Circle(1)]
    print(sorted(shape.area() for shape in shapes))
    stack = Stack()
    stack.push(1)
    stack.push(2)
    print(stack.pop())  # 2
    print(Point(0, 0).distance_to(Point(3, 4)))  # 5.0
    cart = ShoppingCart()
    cart.add("apple", 0.5)
    cart.add("bread", 2.0)
    print(cart.total())  # 2.5
