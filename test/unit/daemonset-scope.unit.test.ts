// Does the agent's DaemonSet still place a pod on this node? Kubernetes' rule for nodeSelector and
// required node affinity, as the agent applies it on SIGTERM (a node taken out of the DaemonSet is
// left for good: ambient-bpf removes itself).
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { placesOnNode, type NodePlacement } from '../../cni-agent/src/installer/daemonset-scope.js';

const node = { name: 'node-a', labels: { 'kubernetes.io/os': 'linux', pool: 'mesh', cores: '16' } };
const affinity = (...nodeSelectorTerms: object[]): NodePlacement => ({
  affinity: { nodeAffinity: { requiredDuringSchedulingIgnoredDuringExecution: { nodeSelectorTerms } } },
});
const expr = (key: string, operator: string, values?: string[]) => ({
  matchExpressions: [{ key, operator, ...(values ? { values } : {}) }],
});

describe('placesOnNode', () => {
  it('nodeSelector: every label equal', () => {
    assert.equal(placesOnNode({}, node), true);
    assert.equal(placesOnNode({ nodeSelector: { 'kubernetes.io/os': 'linux' } }, node), true);
    assert.equal(placesOnNode({ nodeSelector: { 'kubernetes.io/os': 'linux', pool: 'other' } }, node), false);
    assert.equal(placesOnNode({ nodeSelector: { zone: 'a' } }, node), false);
  });

  it('required node affinity: the operators', () => {
    assert.equal(placesOnNode(affinity(expr('pool', 'In', ['mesh', 'x'])), node), true);
    assert.equal(placesOnNode(affinity(expr('pool', 'In', ['x'])), node), false);
    assert.equal(placesOnNode(affinity(expr('pool', 'NotIn', ['x'])), node), true);
    assert.equal(placesOnNode(affinity(expr('pool', 'NotIn', ['mesh'])), node), false);
    assert.equal(placesOnNode(affinity(expr('zone', 'NotIn', ['a'])), node), true, 'NotIn holds for a missing label');
    assert.equal(placesOnNode(affinity(expr('pool', 'Exists')), node), true);
    assert.equal(placesOnNode(affinity(expr('zone', 'Exists')), node), false);
    assert.equal(placesOnNode(affinity(expr('zone', 'DoesNotExist')), node), true);
    assert.equal(placesOnNode(affinity(expr('pool', 'DoesNotExist')), node), false);
    assert.equal(placesOnNode(affinity(expr('cores', 'Gt', ['8'])), node), true);
    assert.equal(placesOnNode(affinity(expr('cores', 'Lt', ['8'])), node), false);
    assert.equal(placesOnNode(affinity(expr('pool', 'Gt', ['8'])), node), false, 'Gt on a label that is no number');
    assert.equal(placesOnNode(affinity(expr('cores', 'Gt', ['+8'])), node), true, 'a sign, as Go parses it');
    assert.equal(
      placesOnNode(affinity(expr('cores', 'Lt', ['9223372036854775808'])), node),
      false,
      'beyond int64: no number to Go',
    );
    assert.equal(
      placesOnNode(affinity(expr('constructor', 'DoesNotExist')), node),
      true,
      'an Object member is no label',
    );
    assert.equal(placesOnNode({ nodeSelector: { toString: 'x' } }, node), false);
    assert.equal(placesOnNode(affinity(expr('pool', 'Matches', ['mesh'])), node), false, 'an operator the API refuses');
  });

  it('terms are ORed, requirements within a term ANDed, an empty term matches nothing; fields name the node', () => {
    assert.equal(placesOnNode(affinity(expr('pool', 'In', ['x']), expr('pool', 'In', ['mesh'])), node), true);
    assert.equal(
      placesOnNode(
        affinity({
          matchExpressions: [
            { key: 'pool', operator: 'In', values: ['mesh'] },
            { key: 'zone', operator: 'Exists' },
          ],
        }),
        node,
      ),
      false,
    );
    assert.equal(placesOnNode(affinity({}), node), false);
    assert.equal(placesOnNode(affinity(), node), false);
    assert.equal(
      placesOnNode(affinity({ matchFields: [{ key: 'metadata.name', operator: 'In', values: ['node-a'] }] }), node),
      true,
    );
    assert.equal(
      placesOnNode(affinity({ matchFields: [{ key: 'metadata.name', operator: 'NotIn', values: ['node-a'] }] }), node),
      false,
    );
    // Both set: both must hold.
    assert.equal(placesOnNode({ nodeSelector: { pool: 'mesh' }, ...affinity(expr('zone', 'Exists')) }, node), false);
  });
});
