from mps_cli.cli import main

main()
