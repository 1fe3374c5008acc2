from keybrake.cli.main import main

main()
