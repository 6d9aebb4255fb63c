from elastilm.main import main

raise SystemExit(main())
