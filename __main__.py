from elastilm.cli.main import main

raise SystemExit(main())
