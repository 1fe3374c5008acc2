def main() -> None:
    print("keybrake")
