#!/usr/bin/python3
"""Many small class instances with __dict__: create, mutate, link, drop."""
import random


class Node:
    def __init__(self, key, value, parent=None):
        self.key = key
        self.value = value
        self.parent = parent
        self.children = []


rng = random.Random(2024)
checksum = 0
for step in range(25):
    root = Node(0, 0.0)
    nodes = [root]
    for i in range(1, 40000):
        parent = nodes[rng.randrange(len(nodes))]
        node = Node(i, rng.random(), parent)
        parent.children.append(node)
        nodes.append(node)
    for node in nodes[::3]:
        node.extra = node.key * 2  # grows the instance dict
        node.value += len(node.children)
    depth = 0
    node = nodes[-1]
    while node.parent is not None:
        node, depth = node.parent, depth + 1
    checksum = (checksum + depth + sum(len(n.children) for n in nodes[::101]) + len(vars(nodes[3]))) % 1_000_000_007
    for node in nodes:  # break the parent/child cycles so refcounting frees them
        node.parent = None
        node.children = None
    del nodes, root, node
print(checksum)
