"""The input room: planning work items, reading them, telling a corrupt file from a failing store."""
