"""Writes recipes/data/code_tasks.jsonl: small stdin/stdout programming problems with reference solutions; each
row's answer is the JSON list of test cases (the outputs computed by running the reference solution)."""
import json, subprocess, sys
P = [
 ("sum of two", "Read two integers on one line and print their sum.", "a, b = map(int, input().split())\nprint(a + b)", ["3 4", "-5 12", "100 200"]),
 ("max of list", "Read a line of integers and print the largest.", "print(max(map(int, input().split())))", ["3 9 1", "-4 -2 -7", "5"]),
 ("reverse string", "Read a line and print it reversed.", "print(input()[::-1])", ["hello", "abc def", "x"]),
 ("count vowels", "Read a line and print how many vowels (a, e, i, o, u, either case) it has.", "print(sum(c in 'aeiouAEIOU' for c in input()))", ["Hello World", "xyz", "AEIOU aeiou"]),
 ("factorial", "Read n (0 <= n <= 20) and print n factorial.", "import math\nprint(math.factorial(int(input())))", ["0", "5", "20"]),
 ("fizzbuzz", "Read n and print the numbers 1..n one per line, with Fizz for multiples of 3, Buzz for multiples of 5 and FizzBuzz for both.", "n = int(input())\nfor i in range(1, n + 1):\n    print('FizzBuzz' if i % 15 == 0 else 'Fizz' if i % 3 == 0 else 'Buzz' if i % 5 == 0 else i)", ["5", "15", "1"]),
 ("palindrome", "Read a word and print yes if it reads the same backwards, else no.", "w = input().strip()\nprint('yes' if w == w[::-1] else 'no')", ["level", "hello", "a"]),
 ("sum of digits", "Read a non-negative integer and print the sum of its digits.", "print(sum(map(int, input().strip())))", ["12345", "0", "999"]),
 ("primes below", "Read n and print how many primes are smaller than n.", "n = int(input())\nprint(sum(all(p % d for d in range(2, int(p ** 0.5) + 1)) for p in range(2, n)))", ["10", "2", "100"]),
 ("gcd", "Read two positive integers and print their greatest common divisor.", "import math\na, b = map(int, input().split())\nprint(math.gcd(a, b))", ["12 18", "7 13", "100 75"]),
 ("word count", "Read a line and print the number of words in it.", "print(len(input().split()))", ["the quick brown fox", "one", "a b  c"]),
 ("sort numbers", "Read a line of integers and print them sorted ascending, separated by spaces.", "print(*sorted(map(int, input().split())))", ["3 1 2", "5 -1 5 0", "7"]),
 ("fibonacci", "Read n (1 <= n <= 50) and print the n-th Fibonacci number (F1 = F2 = 1).", "n = int(input())\na, b = 1, 1\nfor _ in range(n - 1):\n    a, b = b, a + b\nprint(a)", ["1", "10", "50"]),
 ("uppercase", "Read a line and print it in upper case.", "print(input().upper())", ["hello", "MiXeD case", "123 abc"]),
 ("even numbers", "Read a line of integers and print only the even ones, separated by spaces (an empty line if none).", "print(*[x for x in map(int, input().split()) if x % 2 == 0])", ["1 2 3 4", "1 3 5", "0 -2 7"]),
 ("triangle", "Read n and print a right triangle of n rows of stars: row i has i stars.", "for i in range(1, int(input()) + 1):\n    print('*' * i)", ["3", "1", "5"]),
 ("binary", "Read a non-negative integer and print it in binary without a prefix.", "print(bin(int(input()))[2:])", ["5", "0", "255"]),
 ("anagram", "Read two words on one line and print yes if they are anagrams of each other, else no.", "a, b = input().split()\nprint('yes' if sorted(a) == sorted(b) else 'no')", ["listen silent", "abc abd", "a a"]),
 ("average", "Read a line of integers and print their mean rounded to two decimals.", "xs = list(map(int, input().split()))\nprint(f'{sum(xs) / len(xs):.2f}')", ["1 2 3 4", "10", "1 2"]),
 ("second largest", "Read a line of distinct integers (at least two) and print the second largest.", "print(sorted(map(int, input().split()))[-2])", ["3 9 1", "-1 -5", "10 20 30 40"]),
 ("char frequency", "Read a word and print each distinct letter with its count as letter:count, in order of first appearance, one per line.", "w = input().strip()\nfor c in dict.fromkeys(w):\n    print(f'{c}:{w.count(c)}')", ["hello", "aaa", "abcab"]),
 ("leap year", "Read a year and print yes if it is a leap year in the Gregorian calendar, else no.", "y = int(input())\nprint('yes' if y % 4 == 0 and (y % 100 != 0 or y % 400 == 0) else 'no')", ["2024", "1900", "2000"]),
 ("collatz steps", "Read a positive integer n and print how many steps the Collatz map (n/2 if even, 3n+1 if odd) takes to reach 1.", "n, s = int(input()), 0\nwhile n != 1:\n    n = n // 2 if n % 2 == 0 else 3 * n + 1\n    s += 1\nprint(s)", ["1", "6", "27"]),
 ("multiplication table", "Read n and print the n x n multiplication table, rows of numbers separated by spaces.", "n = int(input())\nfor i in range(1, n + 1):\n    print(*[i * j for j in range(1, n + 1)])", ["3", "1", "4"]),
]
out = open(sys.argv[1], "w")
for name, text, sol, inputs in P:
    cases = []
    for i in inputs:
        r = subprocess.run([sys.executable, "-c", sol], input=i + "\n", capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, (name, r.stderr)
        cases.append({"input": i + "\n", "output": r.stdout})
    prompt = f"{text} Answer with the program in one ```python code block."
    out.write(json.dumps({"name": name, "prompt": prompt, "answer": json.dumps(cases), "solution": sol}) + "\n")
