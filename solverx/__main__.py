from solverx.cli import main

raise SystemExit(main())
